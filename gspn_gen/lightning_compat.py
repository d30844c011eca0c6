"""Every private name of Lightning, jsonargparse and torch that gspn-gen relies on, in one place.

Lightning offers no public way to do a few things the training command needs (replace a checkpoint in
place, find a run's last checkpoint, take SIGTERM over, stop only at optimizer-step boundaries, keep
metrics.csv across a resume, keep the command line's settings over a checkpoint's, say a config error
in one line). Each such use is a small function or hook here, and `PRIVATE_NAMES` lists what they touch:
`missing_private_names()` (run by tests/test_lightning_compat.py) names any that an upgrade removed or
renamed, so an upgrade fails there, loudly, instead of somewhere in the middle of a run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

# (owner, name, what it is used for). Owners are classes; names of instances are looked up on one.
PRIVATE_NAMES = (
    ("lightning.pytorch.LightningModule", "_trainer", "whether a module is attached to a trainer (resume or load)"),
    ("lightning.pytorch.LightningModule", "_hparams", "hyper-parameters as first saved (plain containers)"),
    ("lightning.pytorch.LightningModule", "_hparams_initial", "what Lightning logs and saves as hparams.yaml"),
    ("lightning.pytorch.Trainer", "_signal_connector", "Lightning's SIGTERM flag, cleared when we take it over"),
    ("lightning.pytorch.trainer.connectors.signal_connector._SignalConnector", "received_sigterm", "that flag"),
    ("lightning.pytorch.loops.fit_loop._FitLoop", "total_batch_idx", "the batch index seeding a step's randomness"),
    ("lightning.pytorch.loops.fit_loop._FitLoop", "_should_accumulate", "mid gradient accumulation: no stop"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_enable_version_counter", "last.ckpt replaced, no last-v1"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_last_global_step_saved", "whether this step is saved"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_find_last_checkpoints", "the run's last checkpoints"),
    ("lightning.pytorch.cli.LightningCLI", "_parse_ckpt_path", "no merge of a checkpoint's hparams over the CLI"),
    ("lightning.pytorch.cli.LightningCLI", "_instantiate_trainer", "logger, checkpoint IO and callbacks added"),
    ("lightning.pytorch.cli.LightningCLI", "_parser", "the subcommand's parser (config dump on resume)"),
    ("lightning.pytorch.loggers.CSVLogger", "_experiment", "metrics.csv continued across a resume"),
    ("lightning.pytorch.loggers.CSVLogger", "_fs", "the logger's filesystem"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "_check_log_dir_exists", "open an existing metrics.csv"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "_rewrite_with_new_header", "crash-safe rewrite"),
    ("jsonargparse.ArgumentParser", "_actions", "every settings group's fields in --help"),
    ("torch.optim.lr_scheduler.LambdaLR", "_last_lr", "the LR reported after a resume changes the schedule"),
)


def _instances() -> dict[str, object]:
    """One object of each owner whose private names are instance attributes (cheap to build, nothing runs)."""
    import torch
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule, Trainer

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    module = LightningModule()
    module.save_hyperparameters({"x": 1})
    return {
        "lightning.pytorch.LightningModule": module,
        "lightning.pytorch.Trainer": trainer,
        "lightning.pytorch.trainer.connectors.signal_connector._SignalConnector": trainer._signal_connector,
        "lightning.pytorch.loops.fit_loop._FitLoop": trainer.fit_loop,
        "lightning.pytorch.callbacks.ModelCheckpoint": ModelCheckpoint(),
        "lightning.pytorch.loggers.CSVLogger": CSVLogger("."),
        "jsonargparse.ArgumentParser": ArgumentParser(),
        "torch.optim.lr_scheduler.LambdaLR": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
    }


def missing_private_names() -> list[str]:
    """`owner.name` of every entry of PRIVATE_NAMES that the installed libraries no longer have."""
    import importlib

    instances = _instances()
    missing = []
    for owner, name, _ in PRIVATE_NAMES:
        obj = instances.get(owner)
        if obj is None:
            module, _, attr = owner.rpartition(".")
            obj = getattr(importlib.import_module(module), attr, None)
        if obj is None or not hasattr(obj, name):
            missing.append(f"{owner}.{name}")
    return missing


# ---------------------------------------------------------------- module, trainer, loops, callbacks

def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer `module` belongs to, or None (Lightning's `module.trainer` raises instead)."""
    return module._trainer


def keep_initial_hparams(module: L.LightningModule) -> None:
    """Make the hparams as they are now (after a module rewrote some into plain containers) the ones
    Lightning logs and saves."""
    import copy

    module._hparams_initial = copy.deepcopy(module._hparams)


def total_batch_index(trainer: L.Trainer) -> int:
    """Batches taken since the run began, resumes included."""
    return trainer.fit_loop.total_batch_idx


def mid_accumulation(trainer: L.Trainer) -> bool:
    """Whether the batch just taken is inside a gradient accumulation (no optimizer step follows it)."""
    return trainer.fit_loop._should_accumulate()


def clear_received_sigterm(trainer: L.Trainer) -> None:
    """Forget a SIGTERM Lightning's own handler recorded: our handler takes it over."""
    trainer._signal_connector.received_sigterm = False


def replace_checkpoints_in_place(callback: ModelCheckpoint) -> None:
    """Write last.ckpt (and every other name) over the previous file, never beside it as last-v1.ckpt."""
    callback._enable_version_counter = False


def last_saved_step(callback: ModelCheckpoint) -> int:
    """The global step of the checkpoint this callback saved last."""
    return callback._last_global_step_saved


def last_checkpoints(callbacks: Iterable, trainer: L.Trainer) -> set[str]:
    """The last checkpoints (last.ckpt and kin) of a run that its checkpoint callbacks would resume from."""
    found = set()
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint):
            found |= cb._find_last_checkpoints(trainer)
    return found


def set_last_lr(scheduler, values: list[float]) -> None:
    """What a torch LR scheduler reports as its current learning rates."""
    scheduler._last_lr = list(values)


# ---------------------------------------------------------------- LightningCLI and jsonargparse

class CompatCLI(LightningCLI):
    """LightningCLI whose private hooks are public methods of ours: `restore_ckpt_settings` (Lightning's
    merges a checkpoint's hyper-parameters over the command line) and `build_trainer`."""

    def _parse_ckpt_path(self) -> None:
        self.restore_ckpt_settings()

    def restore_ckpt_settings(self) -> None:
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        return self.build_trainer(config, callbacks)

    def build_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        return super()._instantiate_trainer(config, callbacks)

    def subcommand_parser(self, subcommand: str | None):
        return self._parser(subcommand)


def parser_actions(parser) -> list:
    """The argparse actions (options) of a jsonargparse parser."""
    return parser._actions


class WriterHooks(ExperimentWriter):
    """Lightning's CSV writer with its private hooks as methods of ours: `open_existing` (its own deletes
    an existing metrics.csv) and `rewrite_with_header` (its own rewrites in place)."""

    def _check_log_dir_exists(self) -> None:
        self.open_existing()

    def open_existing(self) -> None:
        super()._check_log_dir_exists()

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self.rewrite_with_header(fieldnames)

    def rewrite_with_header(self, fieldnames: list[str]) -> None:
        super()._rewrite_with_new_header(fieldnames)


class WriterCSVLogger(CSVLogger):
    """CSVLogger whose writer comes from `make_writer()`."""

    def make_writer(self) -> ExperimentWriter:
        return ExperimentWriter(log_dir=self.log_dir)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = self.make_writer()
        return self._experiment


_SKIP = ("Does not validate", "Subtypes:", "Errors:", "Given value type", "Problem with given class_path")
# Reports of a subclass-typed option (model.diffusion) that do not help: the other Union member's, and
# the file-path reading of the value; "not a dot import path" is said in words that name the choices.
_NOISE = re.compile(r"Import path \S+ does not correspond to a subclass of \S+|Expected a path but .* not accessible or invalid")
_NOT_A_CLASS = re.compile(r"Expected a dot import path string: .*")


def _readable_type(match: re.Match) -> str:
    t = match.group(1)
    cls = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", t)
    if cls:
        return f"expected {'an' if cls.group(1)[0] in 'aeiou' else 'a'} {cls.group(1)}"
    lit = re.fullmatch(r"typing\.Literal\[(.*)\]", t)
    return f"expected one of {lit.group(1)}" if lit else f"expected {t}"


def one_line(message: str, class_names: Iterable[str] = ()) -> str:
    """jsonargparse's multi-line report -> `--key: expected ..., got VALUE` on one line; `class_names` are
    the choices named when a subclass-typed option is given something that is not a class."""
    keys, reasons, got = [], [], None
    for line in (s.strip() for s in message.strip().splitlines()):
        m = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if m:
            keys.append(m.group(1))
            line = m.group(2)
        if line.startswith("Given value:"):
            nested = re.fullmatch(r"Given value: NestedArg\(key='([^']*)', val='(.*)'\)", line)
            if nested and len(keys) == 1:
                keys.append(nested.group(1))
            if got is None:
                got = nested.group(2) if nested else line.split(":", 1)[1].strip()
            continue
        line = line.lstrip("- ").strip()
        if not line or line.startswith(_SKIP) or line == "Expected a <class 'NoneType'>" or _NOISE.fullmatch(line):
            continue
        if _NOT_A_CLASS.fullmatch(line):
            line = "expected a class name or import path (" + ", ".join(class_names) + ")"
        v = re.search(r"\.?\s*Got value: (.*)$", line)
        if v:
            got, line = got if got is not None else v.group(1), line[: v.start()]
        line = re.sub(r"^Expected an? (.+?)$", _readable_type, line)
        if line not in reasons:
            reasons.append(line)
    if not keys:
        return "; ".join(reasons) if reasons else "invalid arguments"
    key = keys[0] + "".join(f".init_args.{k}" for k in keys[1:]) if "class_path" in message else keys[0]
    choices = [r.removeprefix("expected one of ") for r in reasons if r.startswith("expected one of ")]
    expected = [r for r in reasons if r.startswith("expected ") and not r.startswith("expected one of ")]
    if choices:
        expected.append("expected one of " + ", ".join(choices))
    others = [r for r in reasons if not r.startswith("expected ")]
    text = "; ".join(others + ([" or ".join(expected)] if expected else [])) or "invalid value"
    return f"--{key}: {text}" + (f", got {got!r}" if got is not None else "")
