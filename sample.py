"""Sample class grids or ADM-style .npz batches from a checkpoint: `python sample.py --help`."""

from gspn_gen.entry import run

if __name__ == "__main__":
    run("gspn_gen.sample_cli:main")
