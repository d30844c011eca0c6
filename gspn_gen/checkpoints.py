"""Checkpoints: safe loading, crash-safe writing, and the rules for resuming a run.

Reading: every checkpoint is read with `torch.load(weights_only=True)` (tensors and plain containers,
never arbitrary pickled objects), whoever asks: `sample.py`, the resume check of `train_gen.py` and
Lightning itself (through `SafeCheckpointIO`). A file that cannot be read gives one line saying why
(missing, empty, not a torch file, truncated) and naming the newest readable checkpoint beside it.

Writing: `SafeCheckpointIO` writes each checkpoint beside its target and renames it into place
(gspn_gen.fileio), so the previous checkpoint stays whole until the new one is complete, on any
filesystem and whatever $TMPDIR is; a failed write (full disk) is one line naming the path.

Resuming: the model, diffusion process and data shape of a run are fixed by its first checkpoint
(`RUN_KEYS`); `compare_hparams` tells which keys a resume would change. Execution settings that change
neither the model's function nor its weights (`EXECUTION_ARGS`, `compile`) may change.

Older checkpoints (process as `diffusion: gaussian|flow` plus a `diffusion_args` dict, a `model_args`
dict that may repeat the data shape, distillation settings beside the hyper-parameters) are read
through `upgrade_hparams`, the one place that knows those forms.
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

from gspn_gen.diffusion import KINDS, describe, from_description
from gspn_gen.distill import Distillation
from gspn_gen.fileio import publish, remove_stale_temps, staged_write
from gspn_gen.lit import GenerationModule
from gspn_gen.models.zoo import DATA_FIELDS

# Hyper-parameters that define what a run trains; a resume may not change them.
RUN_KEYS = ("model", "model_args", "diffusion", "num_classes", "in_channels", "input_size", "codec", "distill")
# model_args that change how a step runs (memory, kernels), not the model's function or weights.
EXECUTION_ARGS = ("recompute", "gspn_backend")


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
    settings in the checkpoint's `distillation` entry (now `distill`). Raises ValueError.
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
    if "distill" not in hp:
        old = distillation or {}
        settings = {k: old[k] for k in Distillation.__dataclass_fields__ if k in old}
        hp["distill"] = settings if "teacher" in settings else None
    return hp


def module_kwargs(hparams: dict) -> dict:
    """GenerationModule arguments that rebuild a checkpoint's model for sampling or evaluation (any
    version's hyper-parameters; the distillation teacher is not needed for that and is left out)."""
    kwargs = upgrade_hparams(hparams)
    kwargs.pop("distill", None)
    kwargs["diffusion"] = from_description(kwargs["diffusion"]) if kwargs.get("diffusion") else None
    return kwargs


def build_module(path: str, hparams: dict) -> GenerationModule:
    """GenerationModule from a checkpoint's hyper-parameters; a config it cannot build is a CheckpointError."""
    try:
        return GenerationModule(**module_kwargs(hparams))
    except Exception as e:  # noqa: BLE001 - a crafted or foreign file can hold any value
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path!r} holds a config that cannot be built: {reason}") from None


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


def load_module(path: str, device: str | torch.device = "cpu", accept: Callable[[dict], bool] | None = None,
                kind: str = "checkpoint") -> GenerationModule:
    """Rebuild the GenerationModule of a checkpoint with its weights (model and EMA), in eval mode
    (`accept`, `kind`: see read_checkpoint)."""
    ckpt = read_checkpoint(path, mmap=True, accept=accept, kind=kind)
    module = build_module(path, ckpt["hyper_parameters"])
    check_state_dict(path, module, ckpt["state_dict"])
    module.load_state_dict(ckpt["state_dict"])
    return module.to(device).eval()


def fingerprint(path: str) -> str:
    """Size and SHA-256 of a checkpoint file: changes whenever the file is replaced by another."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return f"{os.path.getsize(path)}:{h.hexdigest()}"


def codec_identity(codec: dict | None) -> dict:
    """What a codec is, without where it is stored: that may change between machines, what it is may not."""
    return {k: v for k, v in (codec or {"name": "identity"}).items() if k != "path"}


def _normalised(key: str, value: Any) -> Any:
    if key == "model_args":  # unset fields keep the preset; execution settings may change
        return {k: v for k, v in (value or {}).items() if v is not None and k not in EXECUTION_ARGS}
    if key == "distill":  # the teacher file may move; its weights are checked on load (gspn_gen.distill)
        return None if value is None else {k: v for k, v in value.items() if k != "teacher"}
    if key == "codec":
        return codec_identity(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def compare_hparams(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, changed): RUN_KEYS whose values differ, then the other differing keys, one line each.

    `saved` may be of any version (`upgrade_hparams`); `current` is a module's hparams.
    """
    try:
        saved, current = upgrade_hparams(saved), upgrade_hparams(current)
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's settings cannot be read: {e}") from None
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
        return read_checkpoint(os.fspath(path), map_location=map_location or "cpu")


class CommitCheckpoints(L.Callback):
    """Publishes a deferred SafeCheckpointIO's checkpoints at the start of the next step (the previous step's
    metrics are logged by then), at the end of training, and when training ends on an error."""

    def __init__(self, io: SafeCheckpointIO):
        self.io = io

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.io.commit()

    def on_train_end(self, trainer, pl_module) -> None:
        self.io.commit()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.io.commit()  # the checkpoints written so far hold finished steps

    def teardown(self, trainer, pl_module, stage) -> None:
        self.io.commit()


def main(argv: list[str] | None = None) -> None:
    """`python -m gspn_gen.checkpoints import-dit|import-sit SRC --out DST`: see gspn_gen.convert."""
    from gspn_gen.convert import main as convert_main

    convert_main(argv)


if __name__ == "__main__":
    main()
