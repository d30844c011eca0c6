"""benchmarks/e2e.py --tiny end to end on the CPU: one JSON row per preset with real measurements, run as
on the GPU image, where omegaconf, jsonargparse, torch-fidelity and diffusers are not installed."""

from __future__ import annotations

import importlib.util
import json

from tests.helpers import REPO, run_as_on_gpu_image


def test_tiny_run_writes_a_row_per_preset(tmp_path):
    out = tmp_path / "e2e.json"
    # One thread in the child only: two OpenMP threads on a busy 2-core machine wait on each other and
    # make this seconds-long run take a minute; the numbers do not matter here, the pipeline does.
    proc = run_as_on_gpu_image(REPO / "benchmarks" / "e2e.py", "--tiny", "--json", out, cwd=tmp_path,
                               env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())

    assert result["mode"] == "tiny"
    assert isinstance(result["device"], str) and result["device"].strip()
    assert result["torch"] and result["date"]
    assert [row["preset"] for row in result["rows"]] == ["GSPN-T/2", "DiT-T/2"]
    for row in result["rows"]:
        assert row["params"] > 0
        cells = [(c["px"], c["batch_size"], c["compiled"]) for c in row["train"]]
        assert cells == [(16, 4, False), (32, 2, False), (16, 4, True)]  # eager cells, then compiled
        for c in row["train"]:
            assert isinstance(c["images_per_s"], float) and c["images_per_s"] > 0, c
            assert c["peak_mem_gib"] is None  # CPU: no allocator statistics
        assert [c["px"] for c in row["forward"]] == [16, 32]
        for c in row["forward"]:
            assert c["latent"] == c["px"]  # pixel space: no VAE factor
            assert isinstance(c["ms_per_image"], float) and c["ms_per_image"] > 0, c
        assert [(c["px"], c["batch_size"]) for c in row["sample"]] == [(16, 4)]
        assert all(isinstance(c["images_per_s"], float) and c["images_per_s"] > 0 for c in row["sample"])

    # the op-class profile of the GSPN preset: a training step and a forward, the scan counted
    profile = result["profile"]
    assert [(p["preset"], p["what"]) for p in profile] == [("GSPN-T/2", "train step"), ("GSPN-T/2", "forward")]
    for p in profile:
        assert set(p["ms"]) == {"scan", "projections", "attention", "mlp", "norms", "other"}
        assert p["ms"]["scan"] > 0 and p["ms"]["projections"] > 0 and p["ms"]["mlp"] > 0
        assert p["ms"]["attention"] == 0  # no attention in a GSPN model
        assert abs(sum(p["share"].values()) - 1) < 1e-6 and p["largest"] in p["ms"]

    assert "GSPN-T/2" in proc.stdout and "DiT-T/2" in proc.stdout  # the printed tables
    assert (tmp_path / "e2e.profile.txt").stat().st_size > 0
    # the forward plot, where matplotlib is installed (the GPU image has it)
    assert (tmp_path / "e2e.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
