"""benchmarks/kernel_bench.py's CPU parts: the plans and bytes-by-design tables, their JSON, the GPU mode with
the device faked, the plot, the exit status on failed cells, and its errors."""

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
    assert {r["dtype"]: r["largest_square_side"] for r in saved["limits"]} == {"bf16": 128, "fp16": 128, "fp32": 104}


def test_plans_table_and_json(tmp_path, monkeypatch, capsys):
    """--plans: a row per architecture, target shape, variant and pass with the design figures; no plan
    (the PyTorch backend) only where the backward does not fit a block's shared memory; the portable
    variant within 1.5x the floor through DRAM, the cluster within 1.15x. Registers come from ptxas when
    NVRTC is installed (kernel_bench --plans); here the planner's assumption, to stay fast."""
    monkeypatch.setattr(bench, "registers", lambda: ({}, "NVRTC not asked in this test"))
    path = tmp_path / "plans.json"
    result = bench.main(["--plans", "--json", str(path)])
    out = capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result)) and saved["mode"] == "plans"
    rows = saved["rows"]
    assert {(r["arch"], r["variant"]) for r in rows} == {("sm_80", "portable"), ("sm_89", "portable"),
                                                         ("sm_90", "cluster"), ("sm_90", "portable")}
    assert len(rows) == 4 * 5 * 2
    missing = {(r["arch"], r["N"], r["H"], r["dtype"], r["pass"]) for r in rows if r["design"] is None}
    assert missing == {("sm_80", 1, 128, "bf16", "bwd"), ("sm_89", 1, 128, "bf16", "bwd")}
    for r in rows:
        d = r["design"]
        if d is None:
            continue
        assert d["dram_x_floor"] <= (1.15 if r["variant"] == "cluster" else 1.5)
        assert 0 < d["modelled_of_copy_bw"] <= 1 and d["ctas_per_sm"] >= 1 and d["inflight_sm"] > 0
        assert r["registers_from"] == "assumed"
    assert "no plan within 163 KB" in out and "sm_90" in out and "NVRTC not asked" in out


def test_plot_of_gpu_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"dtype": "bf16", "tokens": t,
             "variants": {v: {"fwd_ms": f * 0.1 * t / 256, "bwd_ms": f * 0.2 * t / 256}
                          for v, f in (("cluster", 1.0), ("portable", 1.2))},
             "per_column_fwd_bwd_ms": 20.0, "sdpa_fwd_bwd_ms": 0.01 * (t / 256) ** 2, "floor_fwd_ms": 0.05 * t / 256,
             "floor_bwd_ms": 0.1 * t / 256} for t in (256, 1024, 4096, 16384)]
    bench.plot(rows, tmp_path / "plot.png", "a test device")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_mode_plumbing(tmp_path, monkeypatch, capsys):
    """The GPU mode end to end with the device parts faked (kernels, timing, inputs): every row with both
    variants beside their design figures, the tuning sweep, the JSON and the plot come out, and a failing
    column is reported, not fatal, but makes the run's exit status 1."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench.cupy_backend, "unavailable_reason", lambda *variant: None)
    monkeypatch.setattr(bench.cupy_backend, "mix_forward", lambda *a: None)
    monkeypatch.setattr(bench.cupy_backend, "mix_backward", lambda *a: None)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 4.0e12)
    monkeypatch.setattr(bench, "time_ms", lambda fn, **_: (fn(), 0.5)[1])
    monkeypatch.setattr(bench, "_inputs", lambda *shape, seed=0: ([torch.zeros(1)] * 4, torch.zeros(1)))
    monkeypatch.setattr(bench, "_fwd_bwd_ms", lambda op, inputs, dy: 20.0)
    monkeypatch.setattr(bench, "sdpa_ms", lambda *a: 1 / 0)
    monkeypatch.setattr(bench, "_design", lambda *a: {"dram_bytes": 1e9, "t_model_us": 400.0,
                                                       "modelled_of_copy_bw": 0.8})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(bench, "TUNE_GRID", {"loaders": (64, 128), "scan_lanes": (128,), "tile": (16,), "smem": (None,)})
    path = tmp_path / "gpu.json"
    result = bench.run_gpu(bench.parse_args(["--tune", "--json", str(path)]), path)
    out = capsys.readouterr().out
    assert len(result["rows"]) == 5 and len(result["tuning"]) == 2 * 5
    assert result["variants"] == ["cluster", "portable"]
    row = result["rows"][0]
    assert row["sdpa_fwd_bwd_ms"].startswith("error: division by zero") and row["per_column_fwd_bwd_ms"] == 20.0
    for cell in row["variants"].values():
        assert cell["fwd_of_copy_bw"] == pytest.approx(1e9 / 0.5e-3 / 4e12) and cell["speedup_vs_per_column"] == 20.0
        assert cell["fwd_vs_model"] == pytest.approx(500 / 400)
    assert json.loads(path.read_text())["machine"]["device"] == "Fake GPU"
    assert path.with_suffix(".png").exists() and "32x16x16" in out and "portable" in out
    failed = bench.failed_cells(result)
    assert len(failed) == 4 and all("sdpa_fwd_bwd_ms: error: division by zero" in f for f in failed)
    assert bench.failed_cells({"rows": [{"variants": {"cluster": {"fwd_ms": 0.5}}}]}) == []


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
    message = "error: no CUDA device is visible to PyTorch; --plans and --bytes give the tables that need none"
    assert done.stderr.strip().splitlines() == [message]


def test_bad_shape_is_rejected():
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--bytes", "--shapes", "4x64"])
    assert exit_info.value.code == 2
