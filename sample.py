"""Sample class grids or ADM-style .npz batches from a checkpoint: `python sample.py --help`."""

import signal
import sys

# A signal while the libraries load: stop at once (nothing is written yet), exit status 128 + signal.
for _signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signum, lambda signum, frame: sys.exit(128 + signum))

from gspn_gen.sample_cli import main

if __name__ == "__main__":
    try:
        main()
    finally:  # the work is over (done or stopped): a signal during the exit changes nothing
        for _signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(_signum, signal.SIG_IGN)
