"""Checkpoint files: safe reading, crash-safe writing, their settings in today's form, and the rules for
resuming a run. Nothing here builds a model: `gspn_gen.checkpoints.build` rebuilds a GenerationModule from
a checkpoint, `gspn_gen.checkpoints.convert` imports official DiT/SiT files
(`python -m gspn_gen.checkpoints import-dit|import-sit`).

Reading: every checkpoint is read with `torch.load(weights_only=True)` (tensors and plain containers,
never arbitrary pickled objects), whoever asks: `sample.py`, the resume check of `train_gen.py` and
Lightning itself (through `SafeCheckpointIO`). A file that cannot be read gives one line saying why
(missing, empty, not a torch file, truncated) and naming the newest readable checkpoint beside it.

Writing: `SafeCheckpointIO` writes each checkpoint beside its target and renames it into place
(gspn_gen.fileio), so the previous checkpoint stays whole until the new one is complete, on any
filesystem and whatever $TMPDIR is; a failed write (full disk) is one line naming the path.

Resuming: the model, diffusion process and data shape of a run are fixed by its first checkpoint
(`RUN_KEYS`); `compare_hparams` tells which keys a resume would change. Execution settings that change
neither the model's function nor its weights (`EXECUTION_ARGS`, `compile`) may change. The resume
check reads the file once and hands it to Lightning (`SafeCheckpointIO.hand_over`).

Older checkpoints (process as `diffusion: gaussian|flow` plus a `diffusion_args` dict, a `model_args`
dict that may repeat the data shape, distillation settings beside the hyper-parameters, optimiser, EMA
and grid settings as flat names) are read through `upgrade_hparams`, the one place that knows those forms.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from gspn_gen.codecs import codec_identity
from gspn_gen.diffusion import KINDS, describe, from_description
from gspn_gen.fileio import publish, remove_stale_temps, staged_write
from gspn_gen.models.zoo import DATA_FIELDS

# Hyper-parameters that define what a run trains; a resume may not change them.
RUN_KEYS = ("model", "model_args", "diffusion", "num_classes", "in_channels", "input_size", "codec", "distill")
# model_args that change how a step runs (memory, kernels), not the model's function or weights.
EXECUTION_ARGS = ("recompute", "gspn_backend")
# The distillation settings older checkpoints kept beside the hyper-parameters (gspn_gen.distill.Distillation).
DISTILL_FIELDS = ("teacher", "teacher_ema", "output_weight", "layer_weight", "distill_steps")
# Settings written as flat hyper-parameters before they were grouped: old name -> (group, field).
FLAT_SETTINGS = {
    "lr": ("optim", "lr"), "weight_decay": ("optim", "weight_decay"), "betas": ("optim", "betas"),
    "warmup_steps": ("optim", "warmup_steps"), "lr_schedule": ("optim", "lr_schedule"),
    "min_lr_ratio": ("optim", "min_lr_ratio"), "fused_adamw": ("optim", "fused_adamw"),
    "ema_decay": ("ema_args", "decay"), "ema_warmup": ("ema_args", "warmup"),
    "sample_every": ("grids", "every"), "sample_cfg_scale": ("grids", "cfg_scale"), "sample_steps": ("grids", "steps"),
    "sample_per_class": ("grids", "per_class"), "sample_max_classes": ("grids", "max_classes"),
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, not a gspn-gen checkpoint, or does not fit this run."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is left as it was."""


def why_unreadable(path: str, err: Exception) -> str:
    """The reason a torch file could not be loaded, in words, with its size."""
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes; its write was interrupted)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        return f"is not a torch checkpoint ({size} bytes without the zip header torch.save writes)"
    if isinstance(err, pickle.UnpicklingError):
        return "holds pickled Python objects, not only tensors; refused (checkpoints are never unpickled)"
    first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
    return f"is truncated or corrupt ({size} bytes; {type(err).__name__}: {first})"


def _load(path: str, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """torch.load with weights_only=True; raises CheckpointError with a one-line reason."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a bad file for the user
        raise CheckpointError(f"checkpoint {path!r} {why_unreadable(path, e)}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path!r} is not a gspn-gen training checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def newest_readable(directory: str | os.PathLike, exclude: str | os.PathLike | None = None,
                    accept: Callable[[dict], bool] | None = None) -> str | None:
    """The most recently written `*.ckpt` in `directory` that loads as a gspn-gen checkpoint (and that
    `accept` accepts), or None."""
    exclude = os.path.abspath(exclude) if exclude else None
    try:
        candidates = [p for p in Path(directory).glob("*.ckpt") if p.is_file() and str(p.absolute()) != exclude]
    except OSError:
        return None
    for p in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            ckpt = _load(str(p), mmap=True)
        except CheckpointError:
            continue
        if accept is None or accept(ckpt):
            return str(p)
    return None


def read_checkpoint(path: str, map_location: str | torch.device = "cpu", mmap: bool = False,
                    accept: Callable[[dict], bool] | None = None, kind: str = "checkpoint") -> dict:
    """Load a checkpoint dict safely; errors are one line and name the newest readable `kind` beside it
    (a checkpoint that `accept` accepts: only files that could stand in for this one are offered)."""
    try:
        return _load(path, map_location, mmap)
    except CheckpointError as e:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise
        other = newest_readable(directory, exclude=path, accept=accept)
        hint = f"newest readable {kind} there: {other}" if other else f"no readable {kind} in that directory"
        raise CheckpointError(f"{e}; {hint}") from None


def init_args(hparams: dict) -> dict:
    """The GenerationModule constructor arguments stored in a checkpoint (CLI bookkeeping keys dropped)."""
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def upgrade_hparams(hparams: dict, distillation: dict | None = None) -> dict:
    """A checkpoint's hyper-parameters in today's form, whatever version of gspn-gen wrote them.

    Older forms: `diffusion: "gaussian" | "flow"` with a `diffusion_args` dict (now the process's
    {class_path, init_args}); `model_args` repeating the data shape or learn_sigma (now only from the
    data and the process: equal values are dropped, different ones refused); a distillation run's
    settings in the checkpoint's `distillation` entry (now `distill`); optimiser, EMA and grid settings as
    flat names (now the groups `optim`, `ema_args`, `grids`: FLAT_SETTINGS). Raises ValueError.
    """
    hp = init_args(hparams)
    if isinstance(hp.get("diffusion"), str) or "diffusion_args" in hp:
        kind = hp.get("diffusion") or "gaussian"
        if kind not in KINDS:
            raise ValueError(f"unknown diffusion {kind!r}: expected one of {sorted(KINDS)}")
        args = dict(hp.pop("diffusion_args", None) or {})
        respacing = args.pop("timestep_respacing", None)
        if respacing not in (None, ""):
            raise ValueError(f"diffusion_args.timestep_respacing {respacing!r}: a respaced training process is "
                             "not supported; sampling steps are chosen with sampling_steps or --steps")
        hp["diffusion"] = describe(from_description({"class_path": KINDS[kind].__name__, "init_args": args}))
    model_args = {k: v for k, v in (hp.get("model_args") or {}).items() if v is not None}
    for key in DATA_FIELDS:
        if key in model_args:
            given = model_args.pop(key)
            source = "diffusion" if key == "learn_sigma" else key
            actual = from_description(hp["diffusion"]).learn_sigma if key == "learn_sigma" else hp.get(key)
            if given != actual:
                raise ValueError(f"model_args.{key}={given!r} contradicts {source} ({actual!r})")
    hp["model_args"] = model_args
    for name in [k for k in FLAT_SETTINGS if k in hp]:
        group, field = FLAT_SETTINGS[name]
        hp[group] = {**(hp.get(group) or {}), field: hp.pop(name)}
    if "distill" not in hp:
        old = distillation or {}
        settings = {k: old[k] for k in DISTILL_FIELDS if k in old}
        hp["distill"] = settings if "teacher" in settings else None
    return hp


def check_state_dict(path: str, module: torch.nn.Module, state_dict: dict) -> None:
    """Every tensor of `module` present in the checkpoint with its shape, nothing unexpected."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {path!r} does not match its own config: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}"
        )


def nonfinite_tensors(state_dict: dict, prefix: str = "") -> list[str]:
    """Names of floating-point tensors (under `prefix`) holding NaN or inf."""
    return [k for k, v in state_dict.items() if k.startswith(prefix) and torch.is_tensor(v)
            and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def fingerprint(path: str) -> str:
    """Size and SHA-256 of a checkpoint file: changes whenever the file is replaced by another."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return f"{os.path.getsize(path)}:{h.hexdigest()}"


def _normalised(key: str, value: Any) -> Any:
    if key == "model_args":  # unset fields keep the preset; execution settings may change
        return {k: v for k, v in (value or {}).items() if v is not None and k not in EXECUTION_ARGS}
    if key == "distill":  # the teacher file may move; its weights are checked on load (gspn_gen.distill)
        return None if value is None else {k: v for k, v in value.items() if k != "teacher"}
    if key == "codec":
        return codec_identity(value)
    return _plain(value)


def _plain(value: Any) -> Any:
    """Tuples as lists, at any depth (a checkpoint may hold either)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def compare_hparams(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, changed): RUN_KEYS whose values differ, then the other differing keys, one line each.

    Both in today's form: `saved` through `upgrade_hparams`, `current` a module's hparams.
    """
    saved, current = init_args(saved), init_args(current)
    refused, changed = [], []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if key in RUN_KEYS:
            if _normalised(key, old) != _normalised(key, new):
                refused.append(f"{key}: checkpoint {old!r}, now {new!r}")
            elif key == "model_args":
                changed += [f"model_args.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in EXECUTION_ARGS
                            if old.get(k) != new.get(k)]
            elif old != new:
                changed.append(f"{key}: {old!r} -> {new!r}")
        elif isinstance(old, dict) and isinstance(new, dict):  # a settings group: one line per field
            a, b = _plain(old), _plain(new)
            changed += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif _normalised(key, old) != _normalised(key, new):
            changed.append(f"{key}: {old!r} -> {new!r}")
    return refused, changed


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes beside the target (temp, fsync, rename) and reads weights only.

    Lightning's own writer stages the file in $TMPDIR and copies it over the target, which leaves a
    truncated checkpoint when killed on another filesystem. Reads ignore `weights_only=False`.

    With `deferred`, a written checkpoint (complete and fsynced beside its target) is renamed into place,
    and replaced checkpoints are removed, only at `commit()` (`CommitCheckpoints` calls it once the step's
    metrics are logged): a run killed in between resumes from the previous checkpoint, so its log never
    lacks the row of the step it resumes after.
    """

    def __init__(self, deferred: bool = False):
        super().__init__()
        self.deferred = deferred
        self._pending: dict[Path, Path] = {}  # target -> finished temp file
        self._removals: list[str] = []
        self._handed: tuple[str, dict] | None = None  # a checkpoint read already (hand_over)

    def hand_over(self, path: str, checkpoint: dict) -> None:
        """Serve `checkpoint`, already read from `path`, to the next load of that path instead of reading
        it again (the resume check reads it first); kept until then or until `forget`."""
        self._handed = (os.path.abspath(path), checkpoint)

    def forget(self) -> None:
        self._handed = None

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO does not take storage_options")
        remove_stale_temps(os.path.dirname(os.path.abspath(path)))
        try:
            with staged_write(path) as (f, tmp):
                torch.save(checkpoint, f)
            older = self._pending.pop(Path(path), None)
            if older is not None:
                older.unlink(missing_ok=True)
            self._pending[Path(path)] = tmp
            if not self.deferred:
                self.commit()
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot write checkpoint {os.fspath(path)!r}: {e.strerror or e}; the previous checkpoint there "
                "is left as it was"
            ) from None

    def remove_checkpoint(self, path) -> None:
        self._removals.append(os.fspath(path))
        if not self.deferred:
            self.commit()

    def commit(self) -> None:
        """Put the written checkpoints in place, then remove the ones they replace."""
        pending, self._pending = self._pending, {}
        for path, tmp in pending.items():
            publish(tmp, path)
        removals, self._removals = self._removals, []
        for path in removals:
            if Path(path) not in pending:
                super().remove_checkpoint(path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        handed, self._handed = self._handed, None
        if handed is not None and handed[0] == os.path.abspath(path) and map_location in (None, "cpu"):
            return handed[1]
        return read_checkpoint(os.fspath(path), map_location=map_location or "cpu")


class CommitCheckpoints(L.Callback):
    """Publishes a deferred SafeCheckpointIO's checkpoints at the start of the next step (the previous step's
    metrics are logged by then), at the end of training, and when training ends on an error."""

    def __init__(self, io: SafeCheckpointIO):
        self.io = io

    def on_train_start(self, trainer, pl_module) -> None:
        self.io.forget()  # a handed-over checkpoint a strategy read by other means

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.io.commit()

    def on_train_end(self, trainer, pl_module) -> None:
        self.io.commit()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.io.commit()  # the checkpoints written so far hold finished steps

    def teardown(self, trainer, pl_module, stage) -> None:
        self.io.commit()
