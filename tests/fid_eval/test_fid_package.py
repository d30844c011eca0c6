"""fid_eval is the layer below the generator: it imports nothing of gspn_gen, and what both use lives here once."""

import ast
from pathlib import Path

import fid_eval
from fid_eval import digits_data, fileio


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module or "")
    return names


def test_fid_eval_imports_nothing_of_the_generator():
    # every import, inside functions too
    package = Path(fid_eval.__file__).parent
    found = {p.name: sorted(n for n in _imported(p) if n.split(".")[0] == "gspn_gen")
             for p in sorted(package.glob("*.py"))}
    assert len(found) > 10 and not any(found.values()), {k: v for k, v in found.items() if v}


def test_the_sweep_is_a_generator_command(capsys):
    from fid_eval.__main__ import main

    assert main(["sweep", "--ckpt", "x.ckpt"]) == 2  # it samples, so it lives with the generator: said in one line
    assert capsys.readouterr().err.count("python -m gspn_gen.sweep") == 1


def test_the_generator_uses_the_one_writer_and_the_one_digits_split():
    from gspn_gen import fileio as generator_fileio
    from gspn_gen.data import digits as generator_digits

    assert generator_fileio.atomic_write is fileio.atomic_write
    assert generator_fileio.remove_stale_temps is fileio.remove_stale_temps
    assert generator_digits.load_digits_split is digits_data.load_digits_split
