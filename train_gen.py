"""Train a class-conditional generator with LightningCLI: `python train_gen.py fit --config CONFIG.yaml`.

See gspn_gen/train_cli.py (and `python train_gen.py fit --help`) for the options and launch examples.
"""

import signal
import sys

# A signal while the libraries load: stop at once (nothing is written yet), exit status 128 + signal.
for _signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signum, lambda signum, frame: sys.exit(128 + signum))

from gspn_gen.train_cli import main

if __name__ == "__main__":
    try:
        main()
    finally:  # the work is over (done or stopped): a signal during the exit changes nothing
        for _signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(_signum, signal.SIG_IGN)
