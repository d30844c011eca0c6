"""gspn_gen.fileio: the one crash-safe writer (temp name beside the target, fsync, rename)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gspn_gen.fileio import atomic_write, remove_stale_temps, temp_name, write_json, write_text


def test_atomic_write_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_write(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert os.listdir(path.parent) == ["a.txt"], "temp file left behind"
    with atomic_write(path) as f:
        f.write(b"new\n")
    assert path.read_bytes() == b"new\n"


def test_write_json_is_strict(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"fid": 1.5})
    with pytest.raises(ValueError):
        write_json(path, {"fid": float("nan")})
    assert json.loads(path.read_text()) == {"fid": 1.5} and os.listdir(tmp_path) == ["r.json"]


def test_remove_stale_temps_only_touches_dead_writers_of_our_pattern(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".last.ckpt.{dead_pid}.0123abcd.tmp"
    live = temp_name(tmp_path / "last.ckpt")  # this process is alive
    other = [tmp_path / ".last.ckpt.tmp", tmp_path / "notes.tmp", tmp_path / f".x.{dead_pid}.nothex!.tmp"]
    for p in (stale, live, *other):
        p.write_text("x")
    assert remove_stale_temps(tmp_path, "other.ckpt") == []
    assert remove_stale_temps(tmp_path) == [stale]
    assert live.exists() and all(p.exists() for p in other)
