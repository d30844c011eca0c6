"""The project's one crash-safe writer (temp name beside the target, fsync, os.replace), as the generator
imports it. It is defined in `fid_eval.fileio`: the evaluation suite depends on nothing of the generator,
and the generator depends on the evaluation suite, so the writer both use lives there.
"""

from fid_eval.fileio import (
    atomic_write,
    fsync_dir,
    remove_stale_temps,
    temp_name,
    write_bytes,
    write_json,
    write_text,
)

__all__ = ["atomic_write", "fsync_dir", "remove_stale_temps", "temp_name", "write_bytes", "write_json", "write_text"]
