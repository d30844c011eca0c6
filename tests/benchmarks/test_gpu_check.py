"""The GPU check's CPU-visible parts: benchmarks/gpu_check.sh is valid bash whose steps run in the order and
within the limits its first run needs, and the smoke step runs as on the GPU image (no omegaconf,
jsonargparse, torch-fidelity or diffusers) and, without a GPU, writes its JSON and exits 3."""

import json
import re
import shutil
import subprocess

import pytest
import torch

from tests.helpers import REPO, run_as_on_gpu_image

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_steps():
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    text = SCRIPT.read_text()
    steps = re.findall(r"^\s*step (\w+) (\S+) (.*)$", text, flags=re.MULTILINE)
    assert [name for name, _, _ in steps] == ["install", "smoke", "bench", "tests", "memcheck", "e2e"]
    limits = {name: limit for name, limit, _ in steps}
    assert limits == {"install": "30", "smoke": "90", "bench": "75", "tests": "80", "memcheck": "60",
                      "e2e": '"$e2e_limit"'}
    assert 'budget="${GSPN_CHECK_SECONDS:-360}"' in text
    commands = {name: command for name, _, command in steps}
    assert "benchmarks/gpu_smoke.py" in commands["smoke"]
    assert "--maxfail=5" in text and " -x " not in text and "GSPN_REQUIRE_CUDA=1" in commands["tests"]
    assert "--tool memcheck" in commands["memcheck"] and "--reduced" in text
    assert "cuda-portable" in text and "--no-compile" in text  # e2e: both variants, the eager cells
    # every finished step's files are kept before the next step starts, and the status counts every step
    for name in ("smoke", "bench", "tests", "e2e"):
        after = text[text.index(f"step {name} "):]
        following = re.search(r"\n\s*step \w+ ", after[1:])
        assert "keep " in (after[:following.start() + 1] if following else after), name
    assert 'exit "$failed"' in text


def test_smoke_without_a_gpu_writes_json_and_exits_3(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = run_as_on_gpu_image(REPO / "benchmarks" / "gpu_smoke.py", "--json", "smoke.json", cwd=tmp_path,
                               timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["failures"] == ["no CUDA device is visible to PyTorch"]
