"""Sample class grids or ADM-style .npz batches from a checkpoint: `python sample.py --help`."""

from gspn_gen.sample_cli import main

if __name__ == "__main__":
    main()
