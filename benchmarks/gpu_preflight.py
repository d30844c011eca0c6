"""Preflight of the GPU check: is this a machine the GSPN CUDA kernels can run on? Exit 0 when yes, else one
`error:` line naming what is missing and exit 3.

In order: a CUDA device PyTorch sees, compute capability 9.0 or newer (thread-block clusters), CuPy,
NVRTC compiling one kernel of the real sources for sm_90; then every kernel compiled (timed, with each
kernel's registers and local memory) and one small gspn_mix against the oracle.

    python3 benchmarks/gpu_preflight.py
"""

import sys
import time


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(3)


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        fail("no CUDA device is visible to PyTorch (torch.cuda.is_available() is False)")
    index = torch.cuda.current_device()
    name, capability = torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)
    print(f"device: {name}, sm_{capability[0]}{capability[1]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if capability < (9, 0):
        fail(f"{name} is sm_{capability[0]}{capability[1]}; the kernels need sm_90 (H100/H200) for clusters")
    try:
        import cupy
    except Exception as err:  # noqa: BLE001  (ImportError, or a broken install's own error)
        from gspn_gen.kernels.cupy_backend import INSTALL_HINT

        fail(f"CuPy does not import ({type(err).__name__}: {err}); {INSTALL_HINT}")
    print(f"cupy {cupy.__version__}")
    from gspn_gen.kernels import cupy_backend, testing

    start = time.perf_counter()
    try:
        one = "gspn_scan_fwd<F32, 1>"
        module = cupy.RawModule(code=cupy_backend.source(), options=cupy_backend.COMPILE_OPTIONS, name_expressions=[one])
        module.get_function(one)
    except Exception as err:  # noqa: BLE001  (NVRTC, driver and loader errors come in several types)
        fail(f"NVRTC could not compile and load {one}: {str(err).strip()[:2000]}")
    print(f"NVRTC compiled and loaded {one} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    reason = cupy_backend.unavailable_reason()
    if reason is not None:
        fail(reason)
    kernels = cupy_backend._kernels(index)
    print(f"compiled all {len(kernels)} kernels in {time.perf_counter() - start:.1f} s "
          "(CuPy keeps them in its disk cache)")
    for kernel_name, kernel in sorted(kernels.items()):
        print(f"  {kernel_name:28} {kernel.num_regs:3d} registers, {kernel.local_size_bytes} B local, "
              f"up to {kernel.max_threads_per_block} threads")
    inputs, _ = testing.mix_inputs(2, 8, 4, 16, 16, torch.bfloat16, "cuda")
    y = cupy_backend.mix_forward(*inputs, None)
    from gspn_gen.kernels.reference import gspn_mix_reference

    ref = gspn_mix_reference(*(t.double().cpu() for t in inputs), None)
    err = (y.double().cpu() - ref).abs().max().item()
    if not err < 0.05 * max(1.0, ref.abs().max().item()):
        fail(f"gspn_mix on the GPU is off the oracle by {err:.3g} at 2x8x16x16 bf16")
    print(f"preflight ok: gspn_mix 2x8x16x16 bf16 within {err:.2g} of the oracle")


if __name__ == "__main__":
    main()
