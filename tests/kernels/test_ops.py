"""Public GSPN ops (kernels/ops.py): validation messages, backend dispatch, the custom ops (fake tensors,
torch.compile, what autograd keeps), import without CuPy."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from gspn_gen.kernels import available_backends, cpu_backend, gspn_mix, gspn_scan, ops, torch_backend
from gspn_gen.kernels.testing import mix_inputs


def mix_args(n=2, c=4, cg=2, h=3, w=5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return {"x": torch.randn(n, c, h, w, generator=gen).to(dtype),
            "gate_logits": torch.randn(n, 4, 3, cg, h, w, generator=gen).to(dtype),
            "lam": torch.randn(n, 4, c, h, w, generator=gen).to(dtype),
            "u": torch.randn(n, 4, c, h, w, generator=gen).to(dtype)}


def scan_args(n=2, c=4, cg=2, h=3, w=5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, c, h, w, generator=gen).to(dtype),
            "lam": torch.randn(n, c, h, w, generator=gen).to(dtype),
            **{k: torch.rand(n, cg, h, w, generator=gen).to(dtype) for k in ("g_up", "g_mid", "g_down")}}


def test_public_api():
    from gspn_gen import kernels

    assert sorted(kernels.__all__) == ["available_backends", "gspn_mix", "gspn_scan"]
    assert available_backends()[:2] == ["reference", "torch"]
    assert set(available_backends()) <= {"reference", "torch", "cpu", "cuda"}
    assert ("cpu" in available_backends()) == (cpu_backend.unavailable_reason() is None)


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_tensors_dispatch(backend, dtype):
    """CPU tensors run on the compiled CPU kernel under 'auto' and 'cpu' (where it builds), else on the
    PyTorch backend: the result is exactly that backend's."""
    compiled = cpu_backend.unavailable_reason() is None
    if backend == "cpu" and not compiled:
        with pytest.raises(RuntimeError, match="backend='cpu' is unavailable"):
            gspn_mix(**mix_args(dtype=dtype), backend=backend)
        return
    module = cpu_backend if backend != "torch" and compiled else torch_backend
    args = mix_args(dtype=dtype)
    y = gspn_mix(**args, chunk=2, backend=backend)
    assert y.dtype == dtype and y.shape == args["x"].shape
    torch.testing.assert_close(y, module.mix_forward(*args.values(), 2), rtol=0, atol=0)
    s = scan_args(dtype=dtype)
    expected = module.scan_forward(*s.values(), None)
    torch.testing.assert_close(gspn_scan(**s, backend=backend), expected, rtol=0, atol=0)


def test_gradients_flow_through_public_op():
    args = {k: v.requires_grad_() for k, v in mix_args().items()}
    gspn_mix(**args).square().sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in args.values())


def test_non_contiguous_inputs():
    args = mix_args(h=5, w=4)
    strided = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) for k, v in args.items()}
    assert not strided["x"].is_contiguous()
    torch.testing.assert_close(gspn_mix(**strided, chunk=3), gspn_mix(**args, chunk=3), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Custom ops: what autograd keeps, fake tensors, torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_training_keeps_only_the_inputs(backend):
    """gspn_mix saves nothing for backward beyond its own inputs (no hidden states, no gates), on ctx or
    through save_for_backward, whatever the backend."""
    (x, logits, lam, u), dy = mix_inputs(2, 8, 4, 6, 5, seed=4)
    leaves = [t.requires_grad_() for t in (x, logits, lam, u)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = gspn_mix(*leaves, chunk=3, backend=backend)
    assert sorted(t.data_ptr() for t in saved) == sorted(t.data_ptr() for t in leaves)
    assert not any(isinstance(v, torch.Tensor) for v in vars(y.grad_fn).values())
    grads = torch.autograd.grad(y, leaves, dy)
    assert all(g.shape == t.shape for g, t in zip(grads, leaves))


def test_only_requested_gradients_are_computed(monkeypatch):
    """The backward asks the backend for exactly the gradients autograd needs."""
    asked = []
    real = torch_backend.mix_backward
    monkeypatch.setattr(torch_backend, "mix_backward", lambda *a: asked.append(a[-1]) or real(*a))
    args = mix_args()
    for wanted in range(4):
        leaves = [t.clone().requires_grad_(i == wanted) for i, t in enumerate(args.values())]
        gspn_mix(*leaves, backend="torch").sum().backward()
        assert [t.grad is not None for t in leaves] == [i == wanted for i in range(4)]
        assert asked[-1] == tuple(i == wanted for i in range(4))


def test_double_backward_is_refused():
    """The backward is a hand-written adjoint, not differentiable itself: asking for a second derivative
    raises instead of returning a silently wrong one."""
    leaves = [t.requires_grad_() for t in mix_args().values()]
    y = gspn_mix(*leaves)
    (dx,) = torch.autograd.grad(y, leaves[0], torch.randn_like(y).requires_grad_(), create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        dx.sum().backward()


def test_opcheck():
    """torch.library's own checks of the custom ops: schema, fake implementation, autograd registration."""
    (x, logits, lam, u), _ = mix_inputs(1, 4, 2, 3, 5, seed=6)
    for backend in ops._resolve("auto", x, 2), "torch", "reference":
        torch.library.opcheck(ops._mix_op, (x.requires_grad_(), logits, lam, u, 2, backend))
        s = scan_args()
        torch.library.opcheck(ops._scan_op, (*s.values(), 0, backend))


def test_torch_compile_traces_without_a_graph_break():
    """torch.compile sees gspn_mix as one op (fake tensors give its shape), forward and backward equal eager."""
    torch._dynamo.reset()
    (x, logits, lam, u), dy = mix_inputs(2, 8, 4, 5, 6, seed=8)

    def layer(x, logits, lam, u):
        return gspn_mix(torch.tanh(x), logits, lam, u, chunk=2).relu()

    explained = torch._dynamo.explain(layer)(x, logits, lam, u)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    eager_leaves = [t.clone().requires_grad_() for t in (x, logits, lam, u)]
    comp_leaves = [t.clone().requires_grad_() for t in (x, logits, lam, u)]
    y_eager, y_comp = layer(*eager_leaves), compiled(*comp_leaves)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-6, atol=1e-6)
    for g_comp, g_eager in zip(torch.autograd.grad(y_comp, comp_leaves, dy),
                               torch.autograd.grad(y_eager, eager_leaves, dy)):
        torch.testing.assert_close(g_comp, g_eager, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _with(args, **changes):
    return {**args, **changes}


MIX_BAD = [
    ({"x": torch.randn(2, 4, 3)}, r"x must have shape \(N, C, H, W\)"),
    ({"x": torch.randn(2, 4, 3, 5).long()},
     r"x must be float32, float64, bfloat16 or float16, got torch.int64"),
    ({"gate_logits": torch.randn(2, 4, 3, 2, 3)}, r"gate_logits must have shape \(N, 4, 3, Cg, H, W\)"),
    ({"gate_logits": torch.randn(2, 4, 2, 2, 3, 5)},
     r"gate_logits must have shape \(N, 4, 3, Cg, H, W\) = \(2, 4, 3, 2, 3, 5\)"),
    ({"gate_logits": torch.randn(2, 4, 3, 2, 5, 3)}, r"gate_logits must have shape"),
    ({"gate_logits": torch.randn(2, 4, 3, 3, 3, 5)},
     r"gate_logits has Cg = 3 gate channels, which must divide C = 4"),
    ({"lam": torch.randn(2, 4, 4, 3)}, r"lam must have shape \(N, 4, C, H, W\)"),
    ({"lam": torch.randn(2, 3, 4, 3, 5)},
     r"lam must have shape \(N, 4, C, H, W\) = \(2, 4, 4, 3, 5\), got \(2, 3, 4, 3, 5\)"),
    ({"u": torch.randn(1, 4, 4, 3, 5)},
     r"u must have shape \(N, 4, C, H, W\) = \(2, 4, 4, 3, 5\), got \(1, 4, 4, 3, 5\)"),
    ({"u": torch.randn(2, 4, 4, 3, 5, dtype=torch.float64)},
     r"u has dtype torch.float64, expected torch.float32 like x"),
    ({"lam": torch.randn(2, 4, 4, 3, 5, device="meta")}, r"lam is on meta, expected cpu like x"),
    ({"x": torch.randn(0, 4, 3, 5)},
     r"x must have shape \(N, C, H, W\) with no zero sizes, got \(0, 4, 3, 5\)"),
]


@pytest.mark.parametrize("changes,message", MIX_BAD)
def test_mix_rejects_bad_inputs(changes, message):
    with pytest.raises(ValueError, match=message):
        gspn_mix(**_with(mix_args(), **changes))


SCAN_BAD = [
    ({"lam": torch.randn(2, 4, 3, 4)},
     r"lam must have shape \(N, C, H, W\) = \(2, 4, 3, 5\), got \(2, 4, 3, 4\)"),
    ({"g_mid": torch.rand(2, 2, 3)}, r"g_mid must have shape \(N, Cg, H, W\)"),
    ({"g_down": torch.rand(2, 1, 3, 5)},
     r"g_down must have shape \(N, Cg, H, W\) like g_up = \(2, 2, 3, 5\)"),
    ({"g_up": torch.rand(2, 3, 3, 5), "g_mid": torch.rand(2, 3, 3, 5), "g_down": torch.rand(2, 3, 3, 5)},
     r"g_up has Cg = 3 gate channels, which must divide C = 4"),
    ({"g_mid": torch.rand(2, 2, 3, 5, dtype=torch.float16)},
     r"g_mid has dtype torch.float16, expected torch.float32"),
]


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(TypeError, match=r"u must be a torch.Tensor of shape \(N, 4, C, H, W\), got list"):
        gspn_mix(**_with(mix_args(), u=[1.0]))


@pytest.mark.parametrize("changes,message", SCAN_BAD)
def test_scan_rejects_bad_inputs(changes, message):
    with pytest.raises(ValueError, match=message):
        gspn_scan(**_with(scan_args(), **changes))


@pytest.mark.parametrize("chunk", [0, -2, 2.0, True, "4"])
def test_bad_chunk(chunk):
    with pytest.raises(ValueError, match=r"chunk must be None \(global scan\) or an int >= 1"):
        gspn_mix(**mix_args(), chunk=chunk)
    with pytest.raises(ValueError, match=r"chunk must be None \(global scan\) or an int >= 1"):
        gspn_scan(**scan_args(), chunk=chunk)


def test_bad_backend():
    message = (r"backend must be one of \('auto', 'cuda', 'cuda-cluster', 'cuda-portable', 'cpu', 'torch', "
               r"'reference'\), got 'gpu'")
    with pytest.raises(ValueError, match=message):
        gspn_mix(**mix_args(), backend="gpu")


# ---------------------------------------------------------------------------------------------
# The CUDA backend, where there is none
# ---------------------------------------------------------------------------------------------

def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend='cuda' needs CUDA tensors, got x on cpu"):
        gspn_mix(**mix_args(), backend="cuda")
    with pytest.raises(ValueError, match=r"backend='cuda' needs CUDA tensors"):
        gspn_scan(**scan_args(), backend="cuda")


def _fake_cuda_x(dtype):
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(1, 4, 8, 8))


def test_cuda_backend_rejects_float64():
    with pytest.raises(ValueError, match=r"backend='cuda' supports float32, float16 and bfloat16"):
        ops._resolve("cuda", _fake_cuda_x(torch.float64), 4)
    assert ops._resolve("auto", _fake_cuda_x(torch.float64), 4) == "torch"


def test_missing_cuda_backend(monkeypatch):
    """backend='cuda' without usable kernels names the fix; 'auto' takes the PyTorch backend with one warning."""
    reason = "CuPy is not installed: pip install 'gspn-gen[cuda13]' (or 'gspn-gen[cuda12]' for CUDA 12)"
    monkeypatch.setattr(ops, "_cuda_backend", lambda: (None, reason))
    with pytest.raises(RuntimeError, match=r"backend='cuda' is unavailable: CuPy is not installed: "
                                           r"pip install 'gspn-gen\[cuda13\]'"):
        ops._resolve("cuda", _fake_cuda_x(torch.bfloat16), 4)
    ops._announce.cache_clear()
    with pytest.warns(ops.BackendFallbackWarning, match=r"the CUDA backend is unavailable \(CuPy is not installed"):
        assert ops._resolve("auto", _fake_cuda_x(torch.bfloat16), 4) == "torch"
    assert "cuda" not in available_backends()


def test_maps_the_kernels_cannot_run(monkeypatch):
    """A map outside the CUDA kernels' plan runs on the PyTorch backend under 'auto' and is an error under 'cuda'."""
    kernels = SimpleNamespace(supports=lambda *shape_and_dtype, **options: False)
    monkeypatch.setattr(ops, "_cuda_backend", lambda: (kernels, None))
    assert ops._resolve("auto", _fake_cuda_x(torch.bfloat16), 4) == "torch"
    with pytest.raises(ValueError, match=r"backend='cuda' does not support x of shape \(1, 4, 8, 8\)"):
        ops._resolve("cuda", _fake_cuda_x(torch.bfloat16), 4)


def test_import_and_errors_without_cupy():
    """`from gspn_gen.kernels import gspn_mix` works when CuPy cannot be imported, and the CUDA
    backend then reports the pip extra to install (run in a fresh interpreter)."""
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import torch\n"
        "from types import SimpleNamespace\n"
        "from gspn_gen.kernels import gspn_mix, available_backends\n"
        "from gspn_gen.kernels import ops\n"
        "assert 'cuda' not in available_backends(), available_backends()\n"
        "try:\n"
        "    ops._resolve('cuda', SimpleNamespace(device=torch.device('cuda'), dtype=torch.float32, shape=(1, 2, 3, 4)), 2)\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
        "x = torch.randn(1, 2, 3, 4)\n"
        "lam, u = torch.randn(1, 4, 2, 3, 4), torch.randn(1, 4, 2, 3, 4)\n"
        "y = gspn_mix(x, torch.randn(1, 4, 3, 2, 3, 4), lam, u)\n"
        "assert y.shape == x.shape\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "backend='cuda' is unavailable" in out.stdout and "pip install 'gspn-gen[cuda" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_backend_on_cuda_matches_cpu():
    args = mix_args(n=2, c=8, cg=4, h=6, w=5)
    args = {k: v.requires_grad_() for k, v in args.items()}
    cuda = {k: v.detach().cuda().requires_grad_() for k, v in args.items()}
    y = gspn_mix(**args, chunk=2)
    y_cuda = gspn_mix(**cuda, chunk=2, backend="torch")
    torch.testing.assert_close(y_cuda.cpu(), y, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    y_cuda.sum().backward()
    for k in args:
        torch.testing.assert_close(cuda[k].grad.cpu(), args[k].grad, rtol=1e-4, atol=1e-4)
