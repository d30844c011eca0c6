"""benchmarks/e2e.py --tiny end to end on the CPU: one JSON row per preset with real measurements, run as
on the GPU image, where omegaconf, jsonargparse, torch-fidelity and diffusers are not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_IMAGE = ("omegaconf", "jsonargparse", "torch_fidelity", "diffusers")

# Runs the script with those packages unimportable and their metadata gone (optional-dependency checks
# read it), so that an import of one of them, however deep or late, fails the run.
RUN_WITHOUT = f"""
import importlib.metadata as metadata, runpy, sys
ABSENT = {ABSENT_ON_GPU_IMAGE!r}
def absent(name):
    return name.split(".")[0].replace("-", "_").lower() in ABSENT
class Absent:
    def find_spec(self, name, path=None, target=None):
        if absent(name):
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU image)")
sys.meta_path.insert(0, Absent())
def hide(lookup):
    def hidden(name, *args, **kwargs):
        if absent(name):
            raise metadata.PackageNotFoundError(name)
        return lookup(name, *args, **kwargs)
    return hidden
metadata.version, metadata.distribution = hide(metadata.version), hide(metadata.distribution)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_tiny_run_writes_a_row_per_preset(tmp_path):
    out = tmp_path / "e2e.json"
    # One thread in the child only: two OpenMP threads on a busy 2-core machine wait on each other and
    # make this seconds-long run take a minute; the numbers do not matter here, the pipeline does.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, str(REPO / "benchmarks" / "e2e.py"), "--tiny", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
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
