"""Small forward + backward runs of every CUDA kernel path, for compute-sanitizer (not a pytest module).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python3 tests/gpu/sanitizer_smoke.py [--reduced]
    compute-sanitizer --tool racecheck --error-exitcode 3 python3 tests/gpu/sanitizer_smoke.py --reduced

Odd shapes, compact gates (inside a CTA and through the scratch epilogue), chunks, long lines, 16-byte,
4-byte and scalar copies, 2 and 3 pipeline stages, fp32 / bf16 / fp16, gspn_mix in each variant the GPU
runs (cluster, portable) and gspn_scan. memcheck finds out-of-bounds global and shared accesses (with
PyTorch's caching allocator off, every tensor is its own allocation); racecheck finds shared-memory
hazards such as a missing __syncthreads. --reduced: three cases that still reach every kernel and both
copy kinds, for the GPU check's 60 s of memcheck. The variants are named explicitly: no trial runs here.
"""

import argparse

import torch
from gspn_gen.kernels import cuda_plan, cupy_backend, testing
from gspn_gen.kernels.cuda_plan import Launch

CASES = [
    ((1, 4, 2, 9, 8), 3, torch.float32, Launch(loaders=32, scan_lanes=64, tile=4)),
    ((2, 3, 3, 5, 1), None, torch.bfloat16, Launch()),
    ((1, 4, 1, 6, 70), 4, torch.float32, Launch(loaders=32, scan_lanes=16, tile=4)),
    ((1, 2, 2, 3, 200), None, torch.float16, Launch()),
    ((1, 4, 4, 16, 16), 5, torch.bfloat16, Launch(tile=8, stages=2)),
    ((1, 2, 2, 24, 32), None, torch.bfloat16, Launch(loaders=32, tile=8, stages=3)),
]
REDUCED = [CASES[0], CASES[2], CASES[5]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reduced", action="store_true", help="the three-case list of the GPU check")
    cases = REDUCED if parser.parse_args(argv).reduced else CASES
    sm = cupy_backend._capability(torch.cuda.current_device())
    variants = [v for v in cuda_plan.VARIANTS if sm >= cupy_backend._MIN_SM[v]]
    for shape, chunk, dtype, launch in cases:
        (x, logits, lam, u), dy = testing.mix_inputs(*shape, dtype, "cuda")
        for variant in variants:
            cupy_backend.mix_forward(x, logits, lam, u, chunk, launch, variant)
            cupy_backend.mix_backward(dy, x, logits, lam, u, chunk, (True,) * 4, launch, variant)
        (x, lam, *gates), dh = testing.scan_inputs(*shape, dtype, "cuda")
        cupy_backend.scan_forward(x, lam, *gates, chunk, launch, variants[-1])
        cupy_backend.scan_backward(dh, x, lam, *gates, chunk, (True,) * 5, launch, variants[-1])
    torch.cuda.synchronize()
    print(f"sanitizer smoke: ran {len(cases)} cases of gspn_mix ({', '.join(variants)}) and gspn_scan, "
          "forward + backward")


if __name__ == "__main__":
    main()
