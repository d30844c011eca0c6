"""How the top-level commands start and end under SIGTERM/SIGINT (`train_gen.py`, `sample.py`).

A signal while the libraries load stops the command at once, exit status 128 + signal: nothing is
written yet. The command's own handlers (gspn_gen.stopping) take over once it runs; when it is over,
done or stopped, a signal during the interpreter's exit changes nothing. This module imports only the
standard library, so the handlers are in place before torch and Lightning load.
"""

import importlib
import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run(target: str) -> None:
    """Import `target` ("package.module:function") and call the function, under the signal rules above."""
    for signum in SIGNALS:
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
    module, function = target.split(":")
    main = getattr(importlib.import_module(module), function)
    try:
        main()
    finally:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
