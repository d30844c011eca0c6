"""`python -m gspn_gen.checkpoints import-dit|import-sit SRC --out DST`: served by gspn_gen.checkpoints.convert."""

from gspn_gen.checkpoints.convert import main

if __name__ == "__main__":
    main()
