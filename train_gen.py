"""Train a class-conditional generator with LightningCLI: `python train_gen.py fit --config CONFIG.yaml`.

See gspn_gen/train_cli.py (and `python train_gen.py fit --help`) for the options and launch examples.
"""

from gspn_gen.entry import run

if __name__ == "__main__":
    run("gspn_gen.train_cli:main")
