"""The op package stands alone: importing every module of it loads nothing of the generator or fid_eval."""

import subprocess
import sys

CHECK = """
import pkgutil, sys
import gspn_gen.kernels as k
for m in pkgutil.iter_modules(k.__path__):
    __import__(f"gspn_gen.kernels.{m.name}")
print(" ".join(sorted(n for n in sys.modules if n.split(".")[0] in ("gspn_gen", "fid_eval"))))
"""


def test_kernels_import_nothing_of_the_generator():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=120)
    loaded = done.stdout.split()
    assert "gspn_gen.kernels.cupy_backend" in loaded and "gspn_gen.kernels.testing" in loaded
    assert [n for n in loaded if n != "gspn_gen" and not n.startswith("gspn_gen.kernels")] == []
