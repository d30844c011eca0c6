"""Safe checkpoint loading: rebuild a GenerationModule from a Lightning checkpoint alone.

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain containers only, never
arbitrary pickled objects. The hyper-parameters saved by `save_hyperparameters()` name the preset,
its overrides, the diffusion process and the codec, so nothing has to be re-typed.
"""

from __future__ import annotations

import os

import torch

from gspn_gen.lit import GenerationModule


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a gspn-gen checkpoint."""


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict safely, with one-line errors for the usual mistakes."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise CheckpointError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {str(e).splitlines()[0]}")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path!r} is not a gspn-gen training checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def init_args(hparams: dict) -> dict:
    """The GenerationModule constructor arguments stored in a checkpoint (CLI bookkeeping keys dropped)."""
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def load_module(path: str, device: str | torch.device = "cpu") -> GenerationModule:
    """Rebuild the GenerationModule of a checkpoint with its weights (model and EMA), in eval mode."""
    ckpt = read_checkpoint(path)
    module = GenerationModule(**init_args(ckpt["hyper_parameters"]))
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path!r} does not match its own config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return module.to(device).eval()



def main(argv: list[str] | None = None) -> None:
    """`python -m gspn_gen.checkpoints import-dit|import-sit SRC --out DST`: see gspn_gen.convert."""
    from gspn_gen.convert import main as convert_main

    convert_main(argv)


if __name__ == "__main__":
    main()
