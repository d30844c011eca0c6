"""Small forward + backward runs of every CUDA kernel path, for compute-sanitizer (not a pytest module).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python3 tests/gpu/sanitizer_smoke.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python3 tests/gpu/sanitizer_smoke.py

Odd shapes, compact gates (inside a CTA and through the scratch epilogue), chunks, long lines, vector
and scalar accesses, fp32 / bf16 / fp16, mix (clusters) and scan. memcheck finds out-of-bounds global
and shared accesses (with PyTorch's caching allocator off, every tensor is its own allocation);
racecheck finds shared-memory hazards such as a missing __syncthreads.
"""

import torch
from gspn_gen.kernels import cupy_backend, testing
from gspn_gen.kernels.cupy_backend import Launch

CASES = [
    ((1, 4, 2, 9, 8), 3, torch.float32, Launch(loaders=32, scan_lanes=64, tile=4)),
    ((2, 3, 3, 5, 1), None, torch.bfloat16, Launch()),
    ((1, 4, 1, 6, 70), 4, torch.float32, Launch(loaders=32, scan_lanes=16, tile=4)),
    ((1, 2, 2, 3, 200), None, torch.float16, Launch()),
    ((1, 4, 4, 16, 16), 5, torch.bfloat16, Launch(tile=8)),
]


def main() -> None:
    for shape, chunk, dtype, launch in CASES:
        (x, logits, lam, u), dy = testing.mix_inputs(*shape, dtype, "cuda")
        cupy_backend.mix_forward(x, logits, lam, u, chunk, launch)
        cupy_backend.mix_backward(dy, x, logits, lam, u, chunk, (True,) * 4, launch)
        (x, lam, *gates), dh = testing.scan_inputs(*shape, dtype, "cuda")
        cupy_backend.scan_forward(x, lam, *gates, chunk, launch)
        cupy_backend.scan_backward(dh, x, lam, *gates, chunk, (True,) * 5, launch)
    torch.cuda.synchronize()
    print(f"sanitizer smoke: ran {len(CASES)} mix and scan forward + backward cases")


if __name__ == "__main__":
    main()
