"""benchmarks/kernel_bench.py's CPU parts: the bytes-by-design table, its JSON, the plot, and its errors."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import kernel_bench as bench
from tests.helpers import REPO, run_as_on_gpu_image


def test_bytes_table_and_json(tmp_path, capsys):
    path = tmp_path / "bytes.json"
    result = bench.main(["--bytes", "--json", str(path)])
    out = capsys.readouterr().out
    assert "1.136" in out and "1.140" in out and "largest square maps" in out
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["machine"]["cpu"] and len(saved["rows"]) == 5
    for row in saved["rows"]:  # the design bar at every default shape, fp32 64 x 64 included
        assert row["design_fwd_x_floor"] <= 1.15 and row["design_bwd_x_floor"] <= 1.15
    assert {r["dtype"]: r["largest_square_side"] for r in saved["limits"]} == {"bf16": 136, "fp16": 136, "fp32": 104}


def test_plot_of_gpu_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"dtype": "bf16", "tokens": t, "ours_fwd_ms": 0.1 * t / 256, "ours_bwd_ms": 0.2 * t / 256,
             "per_column_fwd_bwd_ms": 20.0, "sdpa_fwd_bwd_ms": 0.01 * (t / 256) ** 2, "floor_fwd_ms": 0.05 * t / 256,
             "floor_bwd_ms": 0.1 * t / 256} for t in (256, 1024, 4096, 16384)]
    bench.plot(rows, tmp_path / "plot.png", "a test device")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_mode_plumbing(tmp_path, monkeypatch, capsys):
    """The GPU mode end to end with the device parts faked (kernels, timing, inputs): every row, the
    tuning sweep, the JSON and the plot come out, and a failing column is reported, not fatal."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench.cupy_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(bench.cupy_backend, "mix_forward", lambda *a: None)
    monkeypatch.setattr(bench.cupy_backend, "mix_backward", lambda *a: None)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 4.0e12)
    monkeypatch.setattr(bench, "time_ms", lambda fn, **_: (fn(), 0.5)[1])
    monkeypatch.setattr(bench, "_inputs", lambda *shape, seed=0: ([torch.zeros(1)] * 4, torch.zeros(1)))
    monkeypatch.setattr(bench, "_fwd_bwd_ms", lambda op, inputs, dy: 20.0)
    monkeypatch.setattr(bench, "sdpa_ms", lambda *a: 1 / 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(bench, "TUNE_GRID", {"loaders": (64, 128), "scan_lanes": (128,), "tile": (16,), "smem": (None,)})
    path = tmp_path / "gpu.json"
    result = bench.run_gpu(bench.parse_args(["--tune", "--json", str(path)]), path)
    out = capsys.readouterr().out
    assert len(result["rows"]) == 5 and len(result["tuning"]) == 2 * 5
    row = result["rows"][0]
    assert row["sdpa_fwd_bwd_ms"].startswith("error: division by zero") and row["per_column_fwd_bwd_ms"] == 20.0
    assert 0 < row["ours_fwd_of_copy_bw"] < 1 and row["speedup_vs_per_column"] == 20.0
    assert json.loads(path.read_text())["machine"]["device"] == "Fake GPU"
    assert path.with_suffix(".png").exists() and "32x16x16" in out


def test_bytes_mode_runs_as_on_the_gpu_image(tmp_path):
    """The script as gpu_check.sh runs it: from anywhere, without the generator's training dependencies."""
    done = run_as_on_gpu_image(REPO / "benchmarks" / "kernel_bench.py", "--bytes", "--json", "bytes.json",
                               cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "bytes.json").read_text())["mode"] == "bytes"


def test_gpu_mode_without_a_gpu_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_bench.py")], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 2
    message = "error: no CUDA device is visible to PyTorch; --bytes gives the table that needs none"
    assert done.stderr.strip().splitlines() == [message]


def test_bad_shape_is_rejected():
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--bytes", "--shapes", "4x64"])
    assert exit_info.value.code == 2
