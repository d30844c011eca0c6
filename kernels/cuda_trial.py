"""The trial of a CUDA variant before its first use: compile, launch, synchronise, compare.

``run(variant, device_index)`` compiles every kernel the variant uses (CuPy keeps them in its disk cache),
launches one gspn_mix and one gspn_scan, forward and backward, on small odd-shaped bf16 maps with compact
gates, synchronises, and compares the results with the PyTorch backend on the same GPU (``compare``, which
the GPU check's smoke step also runs at other shapes and dtypes). It returns None, or the reason the
variant cannot be used. ``cupy_backend`` runs it first in a fresh process (``main``,
which prints one JSON line), so that a fault inside a kernel ends that process and leaves the caller's
CUDA context intact, and then once more in the caller's process.

    python -c 'from gspn_gen.kernels import cuda_trial; cuda_trial.main()' cluster 0
"""

from __future__ import annotations

import json
import sys

import torch

from . import cupy_backend, torch_backend
from .testing import mix_inputs, scan_inputs

SHAPE = (2, 6, 3, 11, 24)   # N, C, Cg, H, W: odd H, compact gates, 16-byte vectors along W
CHUNK = 5
# Relative L2 error of the kernels' results against the PyTorch backend in fp32 on the same inputs: the
# rounding of the result dtype (bf16 keeps 8 bits, fp16 11) plus what the scan accumulates over a line.
TOLERANCE = {torch.bfloat16: 0.02, torch.float16: 0.004, torch.float32: 2e-5}
MIX_NAMES = ("y", "dx", "dgate_logits", "dlam", "du")
SCAN_NAMES = ("h", "scan dx", "scan dlam", "dg_up", "dg_mid", "dg_down")


def _relative_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    if got is None or not torch.isfinite(got).all():
        return float("inf")
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def compare(variant: str, device_index: int, shape, dtype: torch.dtype, chunk: int | None,
            seed: int = 11) -> tuple[dict, list]:
    """gspn_mix and gspn_scan, forward and backward, by the kernels of `variant` against the PyTorch backend
    in fp32 on the same GPU: ({output name: relative L2 error}, the kernels' outputs); the error is inf for a
    non-finite or missing output (fresh outputs are NaN under torch's deterministic fill, so an unwritten
    element fails)."""
    device = torch.device("cuda", device_index)
    with torch.cuda.device(device):
        (x, logits, lam, u), dy = mix_inputs(*shape, dtype, device, seed=seed)
        ours = [cupy_backend.mix_forward(x, logits, lam, u, chunk, variant=variant),
                *cupy_backend.mix_backward(dy, x, logits, lam, u, chunk, (True,) * 4, variant=variant)]
        (xs, lams, *gates), dh = scan_inputs(*shape, dtype, device, seed=seed + 1)
        ours += [cupy_backend.scan_forward(xs, lams, *gates, chunk, variant=variant),
                 *cupy_backend.scan_backward(dh, xs, lams, *gates, chunk, (True,) * 5, variant=variant)]
        torch.cuda.synchronize(device)
        f32 = [t.float() for t in (x, logits, lam, u, dy, xs, lams, *gates, dh)]
        want = [torch_backend.mix_forward(*f32[:4], chunk),
                *torch_backend.mix_backward(f32[4], *f32[:4], chunk, (True,) * 4),
                torch_backend.scan_forward(*f32[5:10], chunk),
                *torch_backend.scan_backward(f32[10], *f32[5:10], chunk, (True,) * 5)]
    return {name: _relative_error(got, exp) for name, got, exp in zip(MIX_NAMES + SCAN_NAMES, ours, want)}, ours


def run(variant: str, device_index: int) -> str | None:
    """None when `variant` compiles, launches and matches the PyTorch backend on the device; else why not."""
    try:
        cupy_backend._kernels(device_index, variant)
    except Exception as err:  # noqa: BLE001  (NVRTC and loader errors come in several types)
        return f"the kernels failed to compile: {cupy_backend._first_line(err)}"
    try:
        errors, _ = compare(variant, device_index, SHAPE, torch.bfloat16, CHUNK)
    except Exception as err:  # noqa: BLE001  (launch and driver errors come in several types)
        return f"a trial launch failed: {cupy_backend._first_line(err)}"
    for name, err in errors.items():
        if not err <= TOLERANCE[torch.bfloat16]:
            return f"{name} is off the PyTorch backend by {err:.3g} (relative, bf16 {SHAPE}, chunk {CHUNK})"
    return None


def main(argv: list[str] | None = None) -> None:
    variant, device_index = (argv if argv is not None else sys.argv[1:])[:2]
    reason = run(variant, int(device_index))
    print(json.dumps({"ok": reason is None, "reason": reason}), flush=True)


if __name__ == "__main__":
    main()
