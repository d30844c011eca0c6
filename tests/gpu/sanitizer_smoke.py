"""Small forward + backward runs of the CUDA kernels, for compute-sanitizer (not a pytest module).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 tests/gpu/sanitizer_smoke.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python3 tests/gpu/sanitizer_smoke.py

Odd shapes, compact and full gates, chunks, a line longer than a block, fp32 and bf16; memcheck
finds out-of-bounds global accesses (with PyTorch's caching allocator off, every tensor is its own
allocation), racecheck finds shared-memory hazards such as a missing __syncthreads.
"""

import functools

import torch
from gspn_gen.kernels.cupy_backend import gspn_mix_cuda, gspn_scan_cuda

CASES = [((1, 4, 2, 9, 10), 3), ((2, 3, 3, 5, 1), None), ((1, 2, 1, 1, 7), 2), ((1, 2, 2, 300, 3), None)]


def _rand(dtype, gen, *shape):
    return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen).requires_grad_()


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for (N, C, Cg, H, W), chunk in CASES:
            rand = functools.partial(_rand, dtype, gen)
            mix = [rand(N, C, H, W), rand(N, 4, 3, Cg, H, W), rand(N, 4, C, H, W), rand(N, 4, C, H, W)]
            y = gspn_mix_cuda(*mix, chunk)
            torch.autograd.grad(y, mix, torch.randn_like(y))
            scan = [rand(N, C, H, W), rand(N, C, H, W), rand(N, Cg, H, W), rand(N, Cg, H, W), rand(N, Cg, H, W)]
            h = gspn_scan_cuda(*scan, chunk)
            torch.autograd.grad(h, scan, torch.randn_like(h))
    torch.cuda.synchronize()
    print("sanitizer smoke: ran", 2 * len(CASES), "mix and scan forward + backward cases")


if __name__ == "__main__":
    main()
