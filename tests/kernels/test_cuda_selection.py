"""Safe first contact, without a GPU (the device parts faked): which CUDA variant runs, the trial that decides
it (a fresh process, then this one), the fall from the cluster variant to the portable one to the PyTorch
backend with one warning each, GSPN_BACKEND, and launch errors that name the kernel, plan, grid and shared
memory."""

import json
import subprocess
import warnings
from types import SimpleNamespace

import pytest
import torch
from gspn_gen.kernels import cupy_backend, ops


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible 'GPU' of compute capability 9.0 whose trials the test decides: trials[variant] = reason or
    None for the fresh process, inprocess[variant] for the second trial here; calls are recorded."""
    calls = []
    state = SimpleNamespace(sm=90, trials={}, inprocess={}, calls=calls)
    monkeypatch.setattr(cupy_backend, "_precondition", lambda: None)
    monkeypatch.setattr(cupy_backend, "_capability", lambda index: state.sm)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def subprocess_trial(variant, index):
        calls.append(("subprocess", variant))
        return state.trials.get(variant)

    def inprocess_trial(variant, index):
        calls.append(("inprocess", variant))
        return state.inprocess.get(variant)

    monkeypatch.setattr(cupy_backend, "_trial_subprocess", subprocess_trial)
    monkeypatch.setattr(cupy_backend, "_trial_inprocess", inprocess_trial)
    monkeypatch.delenv("GSPN_BACKEND", raising=False)
    monkeypatch.delenv("GSPN_CUDA_TRIAL", raising=False)
    for cached in (cupy_backend._trial, cupy_backend._selection):
        cached.cache_clear()
    yield state
    for cached in (cupy_backend._trial, cupy_backend._selection):
        cached.cache_clear()


def test_cluster_variant_first_on_sm90(fake_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cupy_backend.variant() == "cluster"
    assert cupy_backend.unavailable_reason() is None
    assert fake_gpu.calls == [("subprocess", "cluster"), ("inprocess", "cluster")]


def test_cluster_failure_falls_to_portable_with_one_warning(fake_gpu):
    fake_gpu.trials["cluster"] = "a trial launch failed: cudaErrorClusterLaunchFailure"
    with pytest.warns(RuntimeWarning) as caught:
        assert cupy_backend.variant() == "portable"
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "cluster variant failed its trial on Fake GPU" in text and "cudaErrorClusterLaunchFailure" in text
    assert "trying the portable variant" in text
    assert cupy_backend.variant() == "portable" and len(fake_gpu.calls) == 3  # decided once per process


def test_every_variant_failing_falls_to_torch(fake_gpu, monkeypatch):
    fake_gpu.trials["cluster"] = "the kernels failed to compile: boom"
    fake_gpu.inprocess["portable"] = "dx is off the PyTorch backend by 0.5"
    with pytest.warns(RuntimeWarning) as caught:
        assert cupy_backend.variant() is None
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "the cluster variant failed" in messages[0] and "trying the portable variant" in messages[0]
    assert "the portable variant failed" in messages[1] and "trying the PyTorch backend" in messages[1]
    reason = cupy_backend.unavailable_reason()
    assert "cluster variant: the kernels failed to compile: boom" in reason and "dx is off" in reason
    monkeypatch.setattr(ops, "_cuda_backend", lambda: (None, reason))
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(1, 4, 8, 8))
    ops._announce.cache_clear()
    with pytest.warns(ops.BackendFallbackWarning, match="using the PyTorch backend"):
        assert ops._resolve("auto", x, 4) == "torch"


def test_no_cluster_variant_below_sm90(fake_gpu):
    fake_gpu.sm = 86
    assert cupy_backend.variant() == "portable"
    assert ("subprocess", "cluster") not in fake_gpu.calls
    assert "needs sm_90+" in cupy_backend.unavailable_reason("cluster")
    fake_gpu.sm = 75
    cupy_backend._selection.cache_clear()
    assert cupy_backend.variant() is None and "need sm_80+" in cupy_backend.unavailable_reason()


def test_gspn_backend_forces_a_variant(fake_gpu, monkeypatch):
    monkeypatch.setenv("GSPN_BACKEND", "cuda-portable")
    assert cupy_backend.variant() == "portable"
    assert [c for c in fake_gpu.calls if c[1] == "cluster"] == []
    cupy_backend._selection.cache_clear()
    cupy_backend._trial.cache_clear()
    monkeypatch.setenv("GSPN_BACKEND", "cuda-cluster")
    fake_gpu.trials["cluster"] = "a trial launch failed: x"
    with pytest.warns(RuntimeWarning, match=r"trying nothing else \(GSPN_BACKEND=cuda-cluster\)"):
        assert cupy_backend.variant() is None


def test_inprocess_trial_skips_the_fresh_process(fake_gpu, monkeypatch):
    monkeypatch.setenv("GSPN_CUDA_TRIAL", "inprocess")
    assert cupy_backend.variant() == "cluster"
    assert fake_gpu.calls == [("inprocess", "cluster")]


def test_no_synchronising_trial_inside_a_graph_capture(fake_gpu, monkeypatch):
    """A first call inside a CUDA-graph capture compiles and loads the kernels but launches nothing here
    (a synchronisation would break the capture); the fresh process's trial decides."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    loaded = []
    monkeypatch.setattr(cupy_backend, "_kernels", lambda index, variant: loaded.append(variant) or {})
    assert cupy_backend.variant() == "cluster"
    assert fake_gpu.calls == [("subprocess", "cluster")] and loaded == ["cluster"]


def test_trial_process_verdicts(monkeypatch):
    """The fresh process's verdict: its JSON line, else its exit status and last error line, or a timeout."""
    def fake_run(stdout="", stderr="", returncode=0, raises=None):
        def run(*args, **kwargs):
            if raises:
                raise raises
            return subprocess.CompletedProcess(args, returncode, stdout, stderr)
        return run

    monkeypatch.setattr(subprocess, "run", fake_run(stdout="compiling...\n" + json.dumps({"ok": True})))
    assert cupy_backend._trial_subprocess("cluster", 0) is None
    monkeypatch.setattr(subprocess, "run", fake_run(stdout=json.dumps({"ok": False, "reason": "y is off"})))
    assert cupy_backend._trial_subprocess("cluster", 0) == "y is off"
    monkeypatch.setattr(subprocess, "run", fake_run(stderr="Traceback\nRuntimeError: illegal address", returncode=1))
    assert cupy_backend._trial_subprocess("portable", 0) == ("the trial process exited with status 1 "
                                                             "(RuntimeError: illegal address)")
    monkeypatch.setattr(subprocess, "run", fake_run(raises=subprocess.TimeoutExpired("python", 900)))
    assert "did not finish within" in cupy_backend._trial_subprocess("portable", 0)


def test_trial_main_prints_one_json_line(monkeypatch, capsys):
    monkeypatch.setattr(cupy_backend, "_trial_inprocess",
                        lambda variant, index: None if variant == "portable" else "no clusters")
    cupy_backend.trial_main(["portable", "0"])
    cupy_backend.trial_main(["cluster", "0"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"ok": True, "reason": None}, {"ok": False, "reason": "no clusters"}]


def test_gspn_backend_replaces_auto(monkeypatch):
    cpu_x = torch.zeros(1, 2, 3, 4)
    monkeypatch.setenv("GSPN_BACKEND", "reference")
    assert ops._resolve("auto", cpu_x, 2) == "reference"
    assert ops._resolve("torch", cpu_x, 2) == "torch"  # an explicit backend wins
    monkeypatch.setenv("GSPN_BACKEND", "cuda-portable")
    with pytest.raises(ValueError, match=r"backend='cuda-portable' needs CUDA tensors, got x on cpu"):
        ops._resolve("auto", cpu_x, 2)
    monkeypatch.setenv("GSPN_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"GSPN_BACKEND must be one of .*, got 'gpu'"):
        ops._resolve("auto", cpu_x, 2)


def test_variant_backend_names(monkeypatch):
    """backend="cuda-cluster" / "cuda-portable" reach cupy_backend with the variant fixed, and are refused
    with the variant's own reason when it cannot run."""
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(1, 4, 8, 8))
    kernels = SimpleNamespace(supports=lambda *shape, variant_=None, backward=True: variant_ == "portable",
                              unavailable_reason=lambda variant: None if variant == "portable" else "needs sm_90+",
                              bound=cupy_backend.bound)
    monkeypatch.setattr(ops, "_cuda_backend", lambda: (kernels, None))
    monkeypatch.setattr(ops, "_cupy_backend", lambda: kernels)
    assert ops._resolve("cuda-portable", x, 4) == "cuda-portable"
    with pytest.raises(RuntimeError, match=r"backend='cuda-cluster' is unavailable: needs sm_90\+"):
        ops._resolve("cuda-cluster", x, 4)
    module = ops._module("cuda-portable")
    assert module.variant == "portable" and module.mix_forward.keywords == {"variant": "portable"}


def test_forward_only_needs_only_a_forward_plan(monkeypatch):
    """Without a gradient, a map whose backward does not fit still runs the kernels' forward."""
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(1, 4, 128, 128))
    kernels = SimpleNamespace(supports=lambda *shape, variant_=None, backward=True: not backward)
    monkeypatch.setattr(ops, "_cuda_backend", lambda: (kernels, None))
    monkeypatch.delenv("GSPN_BACKEND", raising=False)
    assert ops._resolve("auto", x, 4, backward=False) == "cuda"
    assert ops._resolve("auto", x, 4, backward=True) == "torch"
    leaf = torch.zeros(1, requires_grad=True)
    assert ops._needs_backward(leaf) and not ops._needs_backward(leaf.detach())
    with torch.no_grad():
        assert not ops._needs_backward(leaf)


def test_launch_errors_name_kernel_plan_grid_and_shared_memory(monkeypatch):
    class FakeKernel:
        max_threads_per_block = 1024
        max_dynamic_shared_size_bytes = 0

        def __call__(self, grid, block, args, shared_mem):
            raise RuntimeError("cudaErrorInvalidValue: invalid argument")

    fake_cuda = SimpleNamespace()

    class Device:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake_cuda.Device = Device
    monkeypatch.setattr(cupy_backend, "_import_cupy", lambda: SimpleNamespace(cuda=fake_cuda))
    monkeypatch.setattr(cupy_backend, "_wrap_stream", lambda handle, index: Device(index))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(cuda_stream=0))
    with pytest.raises(RuntimeError) as err:
        cupy_backend._launch(FakeKernel(), "gspn_mix_bwd_portable<BF16, 1>", 4608, 192, 69760, cupy_backend._Args(),
                             torch.device("cuda", 0), "plan R=1, 1 planes per CTA, tile 8 x 3 stages")
    text = str(err.value)
    for part in ("gspn_mix_bwd_portable<BF16, 1>", "grid 4608 x 192 threads", "69760 B of shared memory",
                 "plan R=1, 1 planes per CTA", "failed to launch: cudaErrorInvalidValue"):
        assert part in text, text
