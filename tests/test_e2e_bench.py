"""benchmarks/e2e.py --tiny end to end on the CPU: one JSON row per preset with real measurements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_writes_a_row_per_preset(tmp_path):
    out = tmp_path / "e2e.json"
    # One thread in the child only: two OpenMP threads on a busy 2-core machine wait on each other and
    # make this seconds-long run take a minute; the numbers do not matter here, the pipeline does.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "e2e.py"), "--tiny", "--json", str(out)],
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
        assert [c["batch_size"] for c in row["train"]] == [4]
        for c in row["train"]:
            assert isinstance(c["images_per_s"], float) and c["images_per_s"] > 0, c
            assert c["peak_mem_gib"] is None  # CPU: no allocator statistics
        assert [c["px"] for c in row["forward"]] == [16, 32]
        for c in row["forward"]:
            assert c["latent"] == c["px"]  # pixel space: no VAE factor
            assert isinstance(c["ms_per_image"], float) and c["ms_per_image"] > 0, c
    assert "GSPN-T/2" in proc.stdout and "DiT-T/2" in proc.stdout  # the printed tables
    assert not list(tmp_path.glob("*.profile.txt"))  # only with --profile
