"""The compiled CPU kernel (kernels/cpu_backend.py, kernels/cpu/gspn_cpu.cpp) beyond the oracle checks of
test_backends.py: float64 gradcheck, results independent of the thread count, the shared sigmoid's
accuracy, saturated gates, and the fall to the PyTorch backend where no compiler works."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gspn_gen.kernels import cpu_backend, torch_backend
from gspn_gen.kernels.testing import backend_mix, backend_scan, check_mix, mix_inputs, run, scan_inputs

NO_CPU_KERNEL = cpu_backend.unavailable_reason()
needs_kernel = pytest.mark.skipif(NO_CPU_KERNEL is not None,
                                  reason=f"needs a C++ compiler for the CPU kernel: {NO_CPU_KERNEL}")
mix = backend_mix(cpu_backend)
scan = backend_scan(cpu_backend)


@needs_kernel
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck_float64(chunk):
    (x, logits, lam, u), _ = mix_inputs(1, 2, 1, 3, 4, torch.float64, seed=3)
    leaves = [t.requires_grad_() for t in (x, logits, lam, u)]
    assert torch.autograd.gradcheck(lambda *a: mix(*a, chunk), leaves)
    ins, _ = scan_inputs(1, 2, 2, 4, 3, torch.float64, seed=4)
    assert torch.autograd.gradcheck(lambda *a: scan(*a, chunk), [t.requires_grad_() for t in ins])


@needs_kernel
def test_thread_count_does_not_change_results():
    """Work items are groups of gate planes, no reduction crosses them: 1, 2 and 3 threads agree bit for bit."""
    (x, logits, lam, u), dy = mix_inputs(2, 8, 4, 9, 12, seed=5)
    sins, sdy = scan_inputs(2, 6, 3, 10, 7, seed=6)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(mix, [x, logits, lam, u], dy, 3) + run(scan, sins, sdy, None))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_kernel
def test_shared_sigmoid_is_accurate():
    """gspn_line.cuh's sigmoid (polynomial exp, IEEE division; the CUDA kernels use the same one) is within
    2 ulp of the exact value down to 1.2e-38 (z = -87.3) and is held there below (positive, never 0, so
    normalised gates stay finite, -inf included); NaN stays NaN."""
    z = torch.linspace(-110, 110, 400_001)
    ours, exact = cpu_backend.sigmoid(z).double(), torch.sigmoid(z.double())
    normal = z >= -87.3
    ulp = (ours - exact).abs() / (exact * torch.finfo(torch.float32).eps)
    assert ulp[normal].max() <= 2
    assert ((ours[~normal] > 0) & (ours[~normal] <= 1.3e-38)).all()
    special = cpu_backend.sigmoid(torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0]))
    assert special[0].isnan() and special[1] == 1 and 0 < special[2] <= 1.3e-38 and special[3] == 0.5


@needs_kernel
def test_saturated_gates_match_oracle():
    """Gate logits far in the negative tail (around -50, sigmoids near 1e-22): the normalised gates follow
    the ratios of tiny sigmoids, as the oracle's do."""
    ins, dy = mix_inputs(1, 3, 3, 6, 5, seed=7)
    ins[1] = ins[1] * 3 - 50
    check_mix(mix, (1, 3, 3, 6, 5), torch.float32, None, inputs=(ins, dy))


def test_without_a_compiler_the_torch_backend_runs(tmp_path):
    """No working compiler (CXX=/bin/false, empty extension cache): one warning says so, 'auto' runs the
    PyTorch backend with the same results, and backend='cpu' is an error naming the reason."""
    code = (
        "import warnings, torch\n"
        "from gspn_gen.kernels import gspn_mix, available_backends, torch_backend\n"
        "from gspn_gen.kernels.testing import mix_inputs\n"
        "(x, z, lam, u), _ = mix_inputs(1, 4, 2, 5, 6, seed=1)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    ys = [gspn_mix(x, z, lam, u, chunk=2) for _ in range(3)]\n"
        "assert len(caught) == 1, [str(w.message) for w in caught]\n"
        "print(f'{caught[0].category.__name__}: {caught[0].message}')\n"
        "assert all(torch.equal(y, torch_backend.mix_forward(x, z, lam, u, 2)) for y in ys)\n"
        "assert 'cpu' not in available_backends()\n"
        "try:\n"
        "    gspn_mix(x, z, lam, u, backend='cpu')\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    warning, error = out.stdout.strip().splitlines()
    assert warning.startswith("BackendFallbackWarning: gspn_gen.kernels: the compiled CPU backend is unavailable (")
    assert warning.endswith("using the PyTorch backend")
    assert error.startswith("backend='cpu' is unavailable: ")


@needs_kernel
def test_only_requested_outputs_are_written():
    """Gradients not asked for come back as None and the ones asked for equal the full backward's."""
    (x, logits, lam, u), dy = mix_inputs(1, 4, 4, 6, 7, seed=8)
    full = cpu_backend.mix_backward(dy, x, logits, lam, u, 3, (True,) * 4)
    for wanted in range(4):
        needs = tuple(i == wanted for i in range(4))
        part = cpu_backend.mix_backward(dy, x, logits, lam, u, 3, needs)
        assert [g is not None for g in part] == list(needs)
        assert torch.equal(part[wanted], full[wanted])
    assert torch.allclose(full[0], torch_backend.mix_backward(dy, x, logits, lam, u, 3, (True,) * 4)[0], atol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the sanitizer build of the CPU kernel")
def test_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """Every entry point on 120 random shapes (compact gates, sizes down to 1, chunks, 1-3 threads, fp32
    and fp64, some gradients not wanted) with ASan and UBSan: no access outside a buffer, no UB."""
    source = Path(cpu_backend.__file__).with_name("cpu") / "gspn_cpu.cpp"
    driver = Path(__file__).with_name("cpu_sanitizer_driver.cpp")
    exe = tmp_path / "driver"
    build = subprocess.run(["g++", "-O1", "-g", "-std=c++17", "-fopenmp", "-march=native", "-fsanitize=address,undefined",
                            "-fno-sanitize-recover=all", f"-I{source.parent}", str(driver), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert build.returncode == 0, build.stderr
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0"}
    done = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
