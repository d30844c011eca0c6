"""The project's one crash-safe writer (temp name beside the target, fsync, os.replace) and the output
checks that go with it, as the generator imports them. They are defined in `fid_eval.fileio`: the
evaluation suite depends on nothing of the generator, and the generator depends on the evaluation suite,
so the writer both use lives there.
"""

from fid_eval.fileio import (
    OutputError,
    atomic_write,
    available_memory,
    check_output,
    check_writable_dir,
    format_bytes,
    free_bytes,
    fsync_dir,
    publish,
    remove_stale_temps,
    staged_write,
    temp_name,
    write_bytes,
    write_json,
    write_text,
)

__all__ = ["OutputError", "atomic_write", "available_memory", "check_output", "check_writable_dir", "format_bytes",
           "free_bytes", "fsync_dir", "publish", "remove_stale_temps", "staged_write", "temp_name", "write_bytes",
           "write_json", "write_text"]
