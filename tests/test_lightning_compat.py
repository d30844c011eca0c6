"""The private Lightning/jsonargparse/torch names gspn-gen relies on all live in gspn_gen.lightning_compat and
still exist in the installed versions: an upgrade that removes or renames one fails here, naming it."""

from __future__ import annotations

import re
from pathlib import Path

from gspn_gen import lightning_compat

REPO = Path(__file__).resolve().parents[1]
# a private attribute of another library's object: x._name (our own self._name and module-level _names aside)
PRIVATE_ACCESS = re.compile(r"(?<!self)(?<!cls)\.(_[a-z][a-z_]*)\b")
OURS = {"_codec_cache", "_foreach_lerp_"}  # our own cache on a module; a torch op


def test_every_private_name_still_exists():
    missing = lightning_compat.missing_private_names()
    assert not missing, f"the installed Lightning/jsonargparse/torch lack {missing}: adapt gspn_gen/lightning_compat.py"


def test_no_private_name_outside_the_adapter():
    used = {}
    for path in sorted((REPO / "gspn_gen").rglob("*.py")):
        text = path.read_text()
        uses_lightning = re.search(r"^(from|import) (lightning|jsonargparse)", text, re.MULTILINE)
        if path.name == "lightning_compat.py" or not uses_lightning:
            continue
        names = set(PRIVATE_ACCESS.findall(text)) - OURS
        if names:
            used[str(path.relative_to(REPO))] = sorted(names)
    listed = {name for _, name, _ in lightning_compat.PRIVATE_NAMES}
    assert not used, f"private names used outside gspn_gen/lightning_compat.py: {used} (listed there: {sorted(listed)})"


def test_jsonargparse_reports_read_as_one_line():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--lr", type=float)
    try:
        parser.parse_args(["--lr", "abc"])
    except Exception as e:  # noqa: BLE001 - jsonargparse's ArgumentError
        assert lightning_compat.one_line(str(e)) == "--lr: expected a float, got 'abc'"
    else:
        raise AssertionError("jsonargparse accepted a float 'abc'")
