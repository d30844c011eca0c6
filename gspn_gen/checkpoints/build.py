"""A GenerationModule from a checkpoint: for sampling and evaluation (`load_module`), as a distillation
teacher (`hand_teacher`), and shapes only for a layout check (`module_kwargs` on the meta device).

The file is read and its settings upgraded by gspn_gen.checkpoints; this module only builds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gspn_gen.checkpoints import CheckpointError, check_state_dict, read_checkpoint, upgrade_hparams
from gspn_gen.diffusion import from_description
from gspn_gen.distill import DistillationError, check_compatible, shared_keys
from gspn_gen.lit import GenerationModule
from gspn_gen.models.mixer import GSPNMixer


def module_kwargs(hparams: dict) -> dict:
    """GenerationModule arguments of a checkpoint's hyper-parameters (any version's)."""
    kwargs = upgrade_hparams(hparams)
    kwargs["diffusion"] = from_description(kwargs["diffusion"]) if kwargs.get("diffusion") else None
    return kwargs


def build_module(path: str, hparams: dict) -> GenerationModule:
    """GenerationModule from a checkpoint's hyper-parameters; a config it cannot build is a CheckpointError."""
    try:
        return GenerationModule(**module_kwargs(hparams))
    except Exception as e:  # noqa: BLE001 - a crafted or foreign file can hold any value
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path!r} holds a config that cannot be built: {reason}") from None


def load_module(path: str, device: str | torch.device = "cpu", accept: Callable[[dict], bool] | None = None,
                kind: str = "checkpoint") -> GenerationModule:
    """Rebuild the GenerationModule of a checkpoint with its weights (model and EMA), in eval mode
    (`accept`, `kind`: see gspn_gen.checkpoints.read_checkpoint). A distilled model needs no teacher."""
    ckpt = read_checkpoint(path, mmap=True, accept=accept, kind=kind)
    module = build_module(path, ckpt["hyper_parameters"])
    check_state_dict(path, module, ckpt["state_dict"])
    module.load_state_dict(ckpt["state_dict"])
    return module.to(device).eval()


def fits_as_teacher(hparams: dict, student: GenerationModule) -> bool:
    """Whether a checkpoint with these hyper-parameters could teach `student` (an attention model of its
    width and depth, for the same data and process); read from a shapes-only build of its model."""
    try:
        with torch.device("meta"):
            teacher = GenerationModule(**module_kwargs(hparams))
        check_compatible(teacher, student)
    except Exception:  # noqa: BLE001 - any checkpoint that cannot be built or does not fit is no teacher
        return False
    net, own = teacher.model, student.model
    if len(net.blocks) != len(own.blocks) or any(isinstance(b.mixer, GSPNMixer) for b in net.blocks):
        return False
    theirs, ours = net.state_dict(), own.state_dict()
    return all(theirs[k].shape == ours[k].shape for k in shared_keys(net, own))


def hand_teacher(student: GenerationModule) -> None:
    """Load the teacher that `student`'s distill settings name and hand it over (GenerationModule.attach_teacher).

    A missing or unreadable teacher is a CheckpointError that names the newest checkpoint beside it that
    could teach this student; a teacher that does not fit is a DistillationError.
    """
    if student.distill is None:
        raise DistillationError("the model has no distill settings: nothing to distil from")
    teacher = load_module(student.distill.teacher, accept=lambda ckpt: fits_as_teacher(ckpt["hyper_parameters"], student),
                          kind=f"teacher for {student.hparams.model}")
    student.attach_teacher(teacher)
