"""`python train_gen.py fit --config configs/experiments/X.yaml`: LightningCLI over GenerationModule.

One GPU or many nodes: set `trainer.devices`, `trainer.num_nodes`, `trainer.strategy` (ddp, fsdp) in
the config or on the command line; SLURM and torchrun launch it as usual. Examples:

    python train_gen.py fit --config configs/experiments/demo_digits.yaml
    python train_gen.py fit --config configs/experiments/gspn-xl2_in256.yaml --data.root /data/in256
    python train_gen.py fit --config ... --ckpt_path runs/x/checkpoints/last.ckpt      # resume
    python train_gen.py fit --config ... --ckpt_path last      # resume from the run's last.ckpt if there is one
    python train_gen.py fit --config ... --print_config                     # show the merged config

A config file may start from others: a top-level `extends: [a.yaml, b.yaml]` (paths relative to the
file) reads those first, in order, then the file itself, as if given as `--config a.yaml --config
b.yaml --config FILE`; bases may extend others (a cycle or a missing base is an error). So the trainer
and data overlays of configs/trainer/ and configs/data/ are written once and experiments only state
what differs.

A resume is checked before anything in the run directory is touched: the checkpoint must be readable,
finite, and trained with the same model, diffusion and data shape (`checkpoints.RUN_KEYS`); changed
optimiser, schedule, trainer or data-loading settings, and execution settings of the model
(model_args.recompute, model_args.gspn_backend, compile), are allowed and listed one `info:` line each.
Checkpoints are written crash-safe (`checkpoints.SafeCheckpointIO`) and logs are continued, not replaced.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import os
import signal
import sys
import tempfile
import typing
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentError
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gspn_gen.checkpoints import (
    CheckpointError,
    CheckpointWriteError,
    CommitCheckpoints,
    SafeCheckpointIO,
    check_state_dict,
    compare_hparams,
    nonfinite_tensors,
    read_checkpoint,
    upgrade_hparams,
)
from gspn_gen.checkpoints.build import hand_teacher
from gspn_gen.data.datamodule import DataError
from gspn_gen.diffusion import KINDS
from gspn_gen.distill import Distillation, DistillationError
from gspn_gen.fileio import atomic_write, remove_stale_temps, write_bytes
from gspn_gen.lightning_compat import (
    CompatCLI,
    WriterCSVLogger,
    WriterHooks,
    last_checkpoints,
    one_line,
    parser_actions,
    replace_checkpoints_in_place,
)
from gspn_gen.lit import GenerationModule, NonFiniteLossError
from gspn_gen.runlock import LockHeld, RunLock, describe, dir_lock
from gspn_gen.stopping import GracefulStop, TrainingStopped, exit_on_signals

DEFAULT_DATA = "gspn_gen.data.datamodule.DigitsDataModule"
DEFAULT_DIFFUSION = "gspn_gen.diffusion.GaussianDiffusion"
BASE_KEY = "extends"


class ConfigError(ValueError):
    """A config file's `extends` names a missing file or forms a cycle."""


def expand_configs(args: list[str]) -> list[str]:
    """Command-line arguments with each `--config FILE` (or `-c FILE`) whose YAML has `extends:` replaced by its
    bases' `--config` arguments (recursively) and then the file's own settings."""
    out, i = [], 0
    while i < len(args):
        if args[i] in ("--config", "-c") and i + 1 < len(args):
            out += _config_chain(args[i + 1], ())
            i += 2
        elif args[i].startswith(("--config=", "-c=")):
            out += _config_chain(args[i].split("=", 1)[1], ())
            i += 1
        elif args[i].startswith("-c") and len(args[i]) > 2:
            out += _config_chain(args[i][2:], ())
            i += 1
        else:
            out.append(args[i])
            i += 1
    return out


def _config_chain(path: str, outer: tuple[Path, ...]) -> list[str]:
    file = Path(path)
    if not file.is_file():
        return ["--config", path]  # not a file: jsonargparse reads it (a YAML string) or says why not
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError):
        return ["--config", path]  # jsonargparse names the problem
    if not isinstance(data, dict) or BASE_KEY not in data:
        return ["--config", path]
    real = file.resolve()
    if real in outer:
        chain = " -> ".join(str(p) for p in (*outer, real))
        raise ConfigError(f"config {path!r}: {BASE_KEY} forms a cycle ({chain})")
    bases = data.pop(BASE_KEY)
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config {path!r}: {BASE_KEY} must be a file name or a list of them, got {bases!r}")
    out = []
    for base in bases:
        base_file = file.parent / base
        if not base_file.is_file():
            raise ConfigError(f"config {path!r}: {BASE_KEY} {base!r}: no such file ({base_file})")
        out += _config_chain(str(base_file), (*outer, real))
    return out + (["--config", yaml.safe_dump(data, sort_keys=False)] if data else [])


def _fields(cls: type) -> str:
    """`name: type = default` of each constructor argument of `cls`, for help text."""
    hints = typing.get_type_hints(cls.__init__)
    params = [p for p in inspect.signature(cls).parameters.values() if p.name in hints]
    text = (f"{p.name}: {_type_name(hints[p.name])}" + ("" if p.default is p.empty else f" = {p.default!r}")
            for p in params)
    return f"{cls.__name__} ({', '.join(text)})"


def _type_name(t) -> str:
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def info(message: str) -> None:
    if rank_zero_only.rank == 0:
        print(f"info: {message}", file=sys.stderr)


class _AppendingWriter(WriterHooks):
    """Lightning's CSV writer, except that an existing metrics.csv is continued instead of deleted.

    Rows the resumed run logs again are dropped first, so the log reads as one unbroken run: those of
    training batches >= `keep_below` (a training row's step is its batch index) and those of later
    states (an evaluation row's step is the number of steps taken: the one at `keep_below` describes
    the checkpoint itself and stays); all rows when a run starts from scratch (`keep_below` 0).
    """

    def __init__(self, log_dir: str, keep_below: int | None = None):
        self.keep_below = keep_below
        super().__init__(log_dir)

    def open_existing(self) -> None:
        path = Path(self.metrics_file_path)
        remove_stale_temps(path.parent, path.name)
        if not path.is_file():
            return
        data = path.read_bytes()
        if not data.endswith(b"\n"):  # a row torn by a kill: drop it, the resumed run logs that step again
            data = data[: data.rfind(b"\n") + 1]
            write_bytes(path, data)
        header = next(csv.reader(io.StringIO(data.decode())), [])
        if not header:
            path.unlink()
            return
        self.metrics_keys = header
        if self.keep_below is None:
            return
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        kept = [r for r in rows if not self._logged_again(r)]
        if len(kept) < len(rows):
            info(f"{path}: {len(rows) - len(kept)} rows of steps >= {self.keep_below} dropped (this run logs "
                 "those steps again)" if self.keep_below else
                 f"{path}: {len(rows)} rows of an earlier run that left no checkpoint replaced")
            with atomic_write(path, "w") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)

    def _logged_again(self, row: dict) -> bool:
        step = row.get("step") or ""
        if not step.isdigit() or self.keep_below is None:
            return False
        training = any(v not in (None, "") for k, v in row.items() if k and k.startswith("train/"))
        return int(step) > self.keep_below or (int(step) == self.keep_below and (training or not self.keep_below))

    def rewrite_with_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        with atomic_write(self.metrics_file_path, "w") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class ContinuingCSVLogger(WriterCSVLogger):
    """CSVLogger whose metrics.csv survives a resume (rows are appended) and is written at every log step.

    `resume_step` (set before fit: the resumed checkpoint's step, 0 for a fresh run) drops the rows
    that the run will log again.
    """

    def __init__(self, save_dir, name: str = "", version: str = "", flush_logs_every_n_steps: int = 1, **kwargs):
        super().__init__(save_dir, name=name, version=version, flush_logs_every_n_steps=flush_logs_every_n_steps,
                         **kwargs)
        self.resume_step: int | None = None

    def make_writer(self) -> _AppendingWriter:
        return _AppendingWriter(log_dir=self.log_dir, keep_below=self.resume_step)


class GenerationCLI(CompatCLI):
    """Links the datamodule's shape/codec into the model, logs to TensorBoard + CSV, checks resumes, holds
    the run directory's lock (in `locks`) and stops gracefully on SIGTERM/SIGINT (gspn_gen.stopping)."""

    def __init__(self, *args, locks: contextlib.ExitStack, **kwargs):
        self.locks = locks
        self.stopper = GracefulStop()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for src, dst in (("num_classes", "num_classes"), ("channels", "in_channels"), ("size", "input_size"),
                         ("codec", "codec"), ("class_names", "class_names")):
            parser.link_arguments(f"data.{src}", f"model.{dst}", apply_on="instantiate")
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}, "model.diffusion": {"class_path": DEFAULT_DIFFUSION},
                             "trainer.default_root_dir": "runs/default"})
        listed = {"model.diffusion": KINDS.values(), "model.distill": [Distillation]}
        for action in parser_actions(parser):  # every field in --help, not only behind --model.X.help CLASS
            if action.dest in listed:
                action.help += " Fields: " + "; ".join(_fields(cls) for cls in listed[action.dest]) + "."

    def parse_arguments(self, parser, args) -> None:
        # Lightning's, with `extends:` expanded and without its warning about args given from Python.
        args = sys.argv[1:] if args is None else args
        if isinstance(args, dict):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(expand_configs(list(args)))

    def restore_ckpt_settings(self) -> None:
        # Lightning would load the checkpoint here, unchecked, and merge its hyper-parameters over the
        # command line (silently undoing a changed model or lr). `check_resume` compares them instead.
        pass

    def instantiate_classes(self) -> None:
        # Bad values in a config (unknown preset, bad size, missing data root) end in one line, not a traceback.
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        accelerator = str(cfg.get("trainer", {}).get("accelerator"))
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not torch.backends.mps.is_available():
            fail(f"--trainer.accelerator {accelerator!r}: no GPU is available on this machine (use cpu or auto)")
        try:
            super().instantiate_classes()
            if self.model.distill is not None:  # the teacher is handed to the student, not loaded by it
                hand_teacher(self.model)
        except (ValueError, FileNotFoundError, MisconfigurationException) as e:
            fail(one_line(str(e), _kinds()))
        if self.subcommand:
            self.prepare_run(self.config_init[self.subcommand])

    def build_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or "runs/default"
            config["logger"] = [TensorBoardLogger(root, name="", version=""), ContinuingCSVLogger(root)]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        extra = [self.stopper]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            io = SafeCheckpointIO(deferred=True)  # a checkpoint appears once its step is logged
            plugins.append(io)
            extra.insert(0, CommitCheckpoints(io))  # before the stopper, which may end the run at the same hook
        config["plugins"] = plugins
        trainer = super().build_trainer(config, [*callbacks, *extra])
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                # A run directory holds one run (locked, fresh runs into a used one refused), so its
                # checkpoints are replaced in place: last.ckpt is always the newest, never last-v1.ckpt.
                # A symlinked last.ckpt is replaced by the file, its target left alone.
                replace_checkpoints_in_place(cb)
        return trainer

    def before_fit(self) -> None:
        self.stopper.install()
        self.locks.callback(self.stopper.uninstall)

    # ------------------------------------------------------------- before anything is written
    def prepare_run(self, cfg) -> None:
        """Validate the checkpoint to resume and the output directories, and lock them; nothing is written
        before this but the directories themselves."""
        if cfg.get("weights_only") is False:
            fail("--weights_only false is not accepted: checkpoints are only ever read as tensors and plain "
                 "containers (weights_only=True), never unpickled; drop the option")
        if self.trainer.max_steps == 0 or self.trainer.max_epochs == 0:
            name = "max_steps" if self.trainer.max_steps == 0 else "max_epochs"
            fail(f"--trainer.{name} 0: nothing to train and no checkpoint would be written; give a positive "
                 f"number (or -1 for no limit)")
        dirs = {"trainer.default_root_dir": self.trainer.default_root_dir}
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None):
                dirs[f"{type(cb).__name__}.dirpath"] = cb.dirpath
        for name, d in dirs.items():
            try:
                os.makedirs(d, exist_ok=True)
                with tempfile.TemporaryFile(dir=d):
                    pass
            except OSError as e:
                fail(f"{name} {str(d)!r} is not a writable directory: {e.strerror or e}")
        locked = set()
        for name, d in dirs.items() if self.trainer.is_global_zero else ():  # other ranks belong to rank 0's run
            if os.path.realpath(d) not in locked:  # one training per run directory
                locked.add(os.path.realpath(d))
                lock = RunLock(dir_lock(d), f"{name} {str(d)!r}")
                try:
                    self.locks.enter_context(lock)
                except LockHeld as e:
                    fail(f"{e}: two trainings cannot share a run directory; wait for that one to end, or "
                         "train into another --trainer.default_root_dir")
                if lock.stale:
                    info(f"{lock.path}: taken over from a training that ended without releasing it "
                         f"({describe(lock.stale)})")
        step = 0
        if cfg.get("ckpt_path"):
            cfg["ckpt_path"], step = self.check_resume(str(cfg["ckpt_path"]))
        if cfg.get("ckpt_path") in (None, "last"):
            self.refuse_used_directory()
        for logger in self.trainer.loggers:
            if isinstance(logger, ContinuingCSVLogger):
                logger.resume_step = step
        if self.trainer.is_global_zero:
            for d in dirs.values():
                remove_stale_temps(d)

    def refuse_used_directory(self) -> None:
        """A run starting from scratch may not write over the checkpoints of an earlier run."""
        found = last_checkpoints(self.trainer.checkpoint_callbacks, self.trainer)
        if found:
            newest = max(found, key=os.path.getmtime)
            try:
                what = f"step {read_checkpoint(newest, mmap=True).get('global_step', '?')}"
            except CheckpointError:
                what = "unreadable"
            fail(f"{newest} ({what}) holds an earlier run and this one starts from scratch: continue it with "
                 "--ckpt_path last, or train into another --trainer.default_root_dir (or delete it)")

    def check_resume(self, path: str) -> tuple[str, int | None]:
        """(the checkpoint file a resume will load, its global step), after checking it fits this run;
        errors end the run."""
        if path == "last":
            found = last_checkpoints(self.trainer.checkpoint_callbacks, self.trainer)
            if not found:
                info("--ckpt_path last: no last checkpoint yet, starting from scratch")
                return path, 0
            path = max(found, key=os.path.getmtime)
        elif path in ("best", "hpc") or path.startswith("registry"):
            return path, None  # resolved by Lightning; still read through SafeCheckpointIO
        try:
            ckpt = read_checkpoint(path)  # once: Lightning is handed this copy below
            try:
                saved = upgrade_hparams(ckpt["hyper_parameters"], ckpt.get("distillation"))
            except ValueError as e:
                raise CheckpointError(f"cannot resume {path!r}: its settings cannot be read: {e}") from None
            refused, changed = compare_hparams(saved, dict(self.model.hparams))
            if refused:
                raise CheckpointError(
                    f"cannot resume {path!r} with different settings ({'; '.join(refused)}): a resumed run keeps "
                    "its model, diffusion and data shape; use the run's own config, or a new default_root_dir"
                )
            check_state_dict(path, self.model, ckpt["state_dict"])
            bad = nonfinite_tensors(ckpt["state_dict"])
            if bad:
                raise CheckpointError(f"checkpoint {path!r} holds NaN/inf weights in {len(bad)} tensors "
                                      f"(e.g. {bad[0]}); resume from an earlier checkpoint")
        except CheckpointError as e:
            fail(str(e))
        if isinstance(self.trainer.strategy.checkpoint_io, SafeCheckpointIO):
            self.trainer.strategy.checkpoint_io.hand_over(path, ckpt)
        if self.trainer.is_global_zero:  # half-written checkpoints of the killed run
            remove_stale_temps(os.path.dirname(os.path.abspath(path)))
        for line in changed + self._config_changes():
            info(f"resume with changed {line}")
        step = int(ckpt.get("global_step", 0))
        if 0 < self.trainer.max_steps <= step:
            info(f"{path} is at global step {step}, trainer.max_steps is {self.trainer.max_steps}: nothing to train "
                 "(raise --trainer.max_steps to train on)")
        return path, step

    def _config_changes(self) -> list[str]:
        """trainer/data settings that differ from the run's saved config.yaml (allowed on resume)."""
        old_path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "config.yaml"
        try:
            old = yaml.safe_load(old_path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return []
        new = yaml.safe_load(self.subcommand_parser(self.subcommand).dump(self.config[self.subcommand],
                                                                          skip_none=False))
        lines = []
        for section in ("trainer", "data"):
            a, b = _flatten(old.get(section)), _flatten(new.get(section))
            lines += [f"{section}.{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
        return lines


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {} if d is None else {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _kinds() -> list[str]:
    """The diffusion classes, named when a config gives model.diffusion something that is not one."""
    return [cls.__name__ for cls in KINDS.values()]


def main(args: list[str] | None = None) -> None:
    """Run the CLI (`args` as on the command line; default sys.argv[1:])."""
    torch.set_float32_matmul_precision("high")
    try:
        with contextlib.ExitStack() as locks:  # the run directory's lock, released however this ends
            locks.enter_context(exit_on_signals(TrainingStopped))  # until fit takes the signals over
            GenerationCLI(
                GenerationModule,
                L.LightningDataModule,
                subclass_mode_data=True,
                # errors raise instead of printing the whole usage, so main() can say them in one line
                parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                args=args,
                locks=locks,
            )
    except ArgumentError as e:
        print(f"error: {one_line(str(e), _kinds())}  (see: python train_gen.py fit --help)", file=sys.stderr)
        sys.exit(2)
    except (CheckpointError, DataError, ConfigError, DistillationError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLossError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except TrainingStopped as e:
        info(str(e))
        sys.exit(e.code)
    except SIGTERMException:  # Lightning's own, should a SIGTERM reach it before training starts
        info("stopped by SIGTERM")
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
