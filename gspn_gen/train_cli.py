"""`python train_gen.py fit --config configs/experiments/X.yaml`: LightningCLI over GenerationModule.

One GPU or many nodes: set `trainer.devices`, `trainer.num_nodes`, `trainer.strategy` (ddp, fsdp) in
the config or on the command line; SLURM and torchrun launch it as usual. Examples:

    python train_gen.py fit --config configs/experiments/demo_digits.yaml
    python train_gen.py fit --config configs/experiments/gspn-xl2_in256.yaml --data.root /data/in256
    python train_gen.py fit --config ... --ckpt_path runs/x/checkpoints/last.ckpt      # resume
    python train_gen.py fit --config ... --print_config                     # show the merged config
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from gspn_gen.lit import GenerationModule, NonFiniteLossError

DEFAULT_DATA = "gspn_gen.data.datamodule.DigitsDataModule"


class GenerationCLI(LightningCLI):
    """Links the datamodule's shape/codec into the model and logs to TensorBoard + CSV by default."""

    def add_arguments_to_parser(self, parser) -> None:
        for src, dst in (("num_classes", "num_classes"), ("channels", "in_channels"), ("size", "input_size"),
                         ("codec", "codec"), ("class_names", "class_names")):
            parser.link_arguments(f"data.{src}", f"model.{dst}", apply_on="instantiate")
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}, "trainer.default_root_dir": "runs/default"})

    def instantiate_classes(self) -> None:
        # Bad values in a config (unknown preset, bad size, missing data root) end in one line, not a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {_one_line(str(e))}", file=sys.stderr)
            sys.exit(2)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or "runs/default"
            config["logger"] = [TensorBoardLogger(root, name="", version=""), CSVLogger(root, name="", version="")]
        return super()._instantiate_trainer(config, callbacks)


def _one_line(message: str) -> str:
    """jsonargparse's multi-line Union report -> the reasons that matter, on one line."""
    lines = [line.strip() for line in message.strip().splitlines()]
    reasons = [line[2:] for line in lines if line.startswith("- ") and "NoneType" not in line]
    return "; ".join(reasons) if reasons else (lines[0] if lines else "invalid arguments")


def main(args: list[str] | None = None, model_class: type[GenerationModule] = GenerationModule) -> None:
    """Run the CLI; `model_class` is GenerationModule or a subclass (gspn_gen.distill's)."""
    torch.set_float32_matmul_precision("high")
    try:
        GenerationCLI(
            model_class,
            L.LightningDataModule,
            subclass_mode_data=True,
            # errors raise instead of printing the whole usage, so main() can say them in one line
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except ArgumentError as e:
        print(f"error: {_one_line(str(e))}  (see: python train_gen.py fit --help)", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
