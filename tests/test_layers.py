"""The layers README's "What is inside" lists, checked against the imports in the code (inside functions too):
every module has a layer, and imports only its own layer or those below it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Module (or package prefix) -> layer: 3 entry points, 2 training and sampling, 1 models, diffusion, data
# and what they store, 0 the GSPN kernels and the evaluation suite (neither imports the generator).
LAYERS = {
    "train_gen": 3, "sample": 3, "gspn_gen.entry": 3, "gspn_gen.checkpoints.__main__": 3,
    "gspn_gen.train_cli": 2, "gspn_gen.sample_cli": 2, "gspn_gen.sweep": 2, "gspn_gen.lit": 2,
    "gspn_gen.distill": 2, "gspn_gen.fid_callback": 2, "gspn_gen.lightning_compat": 2, "gspn_gen.stopping": 2,
    "gspn_gen.sampling": 2, "gspn_gen.checkpoints.build": 2, "gspn_gen.checkpoints.convert": 2,
    "gspn_gen.checkpoints": 1, "gspn_gen.models": 1, "gspn_gen.diffusion": 1, "gspn_gen.data": 1,
    "gspn_gen.codecs": 1, "gspn_gen.fileio": 1, "gspn_gen.runlock": 1, "gspn_gen.report": 1, "gspn_gen": 1,
    "gspn_gen.kernels": 0, "fid_eval": 0,
}


def modules() -> dict[str, Path]:
    found = {"train_gen": REPO / "train_gen.py", "sample": REPO / "sample.py"}
    for folder, name in (("gspn_gen", "gspn_gen"), ("kernels", "gspn_gen.kernels"), ("fid_eval", "fid_eval")):
        for path in (REPO / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([name, *parts])] = path
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    while parts:
        if ".".join(parts) in LAYERS:
            return LAYERS[".".join(parts)]
        parts.pop()
    return None


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `module` imports, resolved to the longest known name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    resolved = set()
    for name in names:
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        if parts and ".".join(parts) != module:
            resolved.add(".".join(parts))
    return resolved


def test_every_module_has_a_layer_and_imports_point_down():
    known = modules()
    unlisted = sorted(m for m in known if layer(m) is None)
    assert not unlisted, f"modules without a layer (add them to README's 'What is inside' and LAYERS): {unlisted}"
    upward = sorted(f"{m} (layer {layer(m)}) -> {t} (layer {layer(t)})" for m, path in known.items()
                    for t in imports(m, path, known) if layer(t) > layer(m))
    assert not upward, upward
    assert not [m for m, path in known.items() if m.startswith("fid_eval")
                for t in imports(m, path, known) if not t.startswith("fid_eval")], "fid_eval imports the generator"


def test_readme_names_every_package_and_top_level_module():
    inside = (REPO / "README.md").read_text().split("## What is inside", 1)[1].split("\n## ", 1)[0]
    for name in LAYERS:
        if name in ("gspn_gen", "train_gen", "sample") or name.endswith("__main__"):
            continue
        path = name.replace("gspn_gen.kernels", "kernels").replace(".", "/")
        assert f"`{path}/`" in inside or f"`{path}.py`" in inside or f"{path.rsplit('/', 1)[-1]}.py" in inside, \
            f"README's 'What is inside' does not name {path}"
