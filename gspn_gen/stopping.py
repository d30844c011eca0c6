"""SIGTERM and SIGINT end training at the next step boundary, with a resumable checkpoint and a non-zero exit.

A scheduler's SIGTERM (preemption, `scancel`, `kill`) or a Ctrl-C never cuts a step in half: the signal
is noted, the step finishes, `last.ckpt` is written (once: by the checkpoint callback when it saves at
this step anyway) and, before the next step begins, training ends with `TrainingStopped`, whose exit
status is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), so `train && sample` chains and
schedulers see a stopped run, not a finished one. `--ckpt_path last` continues it exactly. Before the
first step has begun there is nothing to save, and a signal stops at once (same exit status); a signal
during the last step lets the run finish as it would have.

Under DDP every rank learns of a signal any rank received at the same step boundary (one all-reduce),
so all ranks stop together; a rank that launched the others forwards the signal to them.
"""

from __future__ import annotations

import contextlib
import os
import signal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gspn_gen.lightning_compat import clear_received_sigterm, last_saved_step, mid_accumulation

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
    """A signal ended the process; the exit status (`code`) is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


@contextlib.contextmanager
def exit_on_signals(error: type[Interrupted] = Interrupted):
    """Within the block SIGTERM and SIGINT raise `error(signum)` at once: a clean exit with status 128 + signal
    instead of a KeyboardInterrupt traceback or an unexplained kill (every writer is atomic, so nothing is
    left half-written). The previous handlers come back afterwards."""
    def handle(signum: int, frame) -> None:
        raise error(signum)

    previous = {signum: signal.signal(signum, handle) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class TrainingStopped(Interrupted):
    """Training stopped on a signal; `code` is 128 + the signal number, `checkpoint` the file written (or None)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None):
        super().__init__(signum)
        self.step, self.checkpoint = step, checkpoint

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return f"stopped by {name} before the first training step; nothing was trained or saved"
        return (f"stopped by {name} after global step {self.step}; {self.checkpoint} holds it "
                "(continue with --ckpt_path last, or --ckpt_path with that file)")


class GracefulStop(L.Callback):
    """Turns SIGTERM/SIGINT into a checkpoint and `TrainingStopped` at the next step boundary (module docstring).

    `install()` takes the signals over (before fit): until training starts a signal stops at once, during
    training it sets a flag that the next step boundary acts on, after the last step it is ignored (the run
    is complete).
    """

    def __init__(self):
        self.signum: int | None = None
        self.phase = "setup"  # then "training", then "done"
        self._stop: TrainingStopped | None = None  # raised at the start of the next step
        self._trainer: L.Trainer | None = None
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------ handlers
    def install(self) -> None:
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        if launcher is not None and getattr(launcher, "procs", None):  # ranks this process started
            launcher.kill(signum)
        if self.phase == "setup":
            raise TrainingStopped(signum)

    # ------------------------------------------------------------ callback
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning put its own SIGTERM handler in place when fit began; it would end the run with exit 0.
        if trainer.received_sigterm and self.signum is None:
            self.signum = signal.SIGTERM
        clear_received_sigterm(trainer)
        self.phase = "training"
        for signum in SIGNALS:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if mid_accumulation(trainer):  # not a step boundary
            return
        signum = self.signum or 0
        if trainer.world_size > 1:  # every rank stops at the same step
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max"))
        if signum and self._stop is None:
            # The checkpoint holds this step; the stop itself waits until the step's metrics are logged.
            self._stop = TrainingStopped(signum, trainer.global_step,
                                         save_last(trainer, pl_module, outputs, batch, batch_idx))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._stop is not None:
            raise self._stop

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.phase = "done"  # a signal during the last step: the run is complete all the same


def save_last(trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> str:
    """Make sure the run's last checkpoint holds this step (where `--ckpt_path last` finds it); its path.

    The checkpoint callbacks save now what they would save at this step anyway (then skip it, having
    saved); only when none writes a last checkpoint is one written here.
    """
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    for cb in callbacks:
        cb.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
    for cb in callbacks:
        if cb.save_last and last_saved_step(cb) == trainer.global_step and cb.last_model_path:
            return cb.last_model_path
    chosen = next((cb for cb in callbacks if cb.save_last), callbacks[0] if callbacks else None)
    if chosen is None or chosen.dirpath is None:
        path = os.path.join(trainer.default_root_dir, "last.ckpt")
    else:
        path = os.path.join(chosen.dirpath, chosen.CHECKPOINT_NAME_LAST + chosen.FILE_EXTENSION)
        chosen.last_model_path = path
    trainer.save_checkpoint(path, weights_only=False)
    return path
