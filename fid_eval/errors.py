"""The one error type of fid_eval: a bad input, a missing file, an unusable weights file.

It subclasses ValueError (the project's convention for bad values); the CLI prints its message on one
line and exits with code 2, so every user-facing failure is a sentence, never a traceback.
"""


class FidEvalError(ValueError):
    """An input, statistics file or weights file that fid_eval cannot use; the message says why."""
