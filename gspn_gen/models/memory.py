"""What one block keeps for backward and what its forward writes, by part (mixer, MLP, other), and its FLOPs.

For one training-mode forward of one block (`measure_block`):
- saved: every tensor autograd keeps for backward, seen through `saved_tensors_hooks` (what ops and
  autograd.Functions save, and the inputs a non-reentrant checkpoint keeps), plus tensors an
  autograd.Function holds as plain attributes of its context; one count per storage (views and repeated
  saves share it), parameters excluded. Casts of parameters (autocast's bf16 weight copies) are counted
  apart as `weight_casts`: they scale with the parameters, not with the batch;
- written: bytes of every new storage an op returns during the forward (temporaries included; parameter
  casts not), a measure of the memory traffic the forward causes;
- flops: matmuls, convolutions and attention counted by torch's FlopCounterMode (a multiply-add counts
  2; grouped-convolution backward counted per group, which torch's own formula does not), plus the
  GSPN scans by `GSPNMixer.scan_flops`; the backward count includes any recomputation.
Bytes are attributed to the part whose forward was running when the tensor was saved or written:
`mixer`, `mlp`, or `other` (norms, adaLN modulation, residual gates, long skips).
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from gspn_gen.models.mixer import GSPNMixer

PARTS = ("mixer", "mlp", "other")


@dataclass
class BlockMemory:
    """Bytes and FLOPs of one block's training forward (and backward) at one batch size."""

    batch: int
    saved: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))    # kept for backward
    weight_casts: int = 0                                                              # parameter casts kept
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))  # new storages
    flops_forward: int = 0
    flops_backward: int | None = None

    @property
    def saved_total(self) -> int:
        return sum(self.saved.values())


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None) -> int:
    """convolution_backward: one forward's worth per gradient computed (input, weight). torch's formula
    swaps the weight's dims and so counts a depthwise conv as a dense one, C times too many."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode with grouped-convolution backward counted correctly."""
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _is_parameter_cast(t: torch.Tensor, params: set[int]) -> bool:
    """Whether t is a differentiable function (cast, view) of parameters only, within a few steps."""
    if t.grad_fn is None:
        return False
    stack, steps = [t.grad_fn], 0
    while stack:
        node = stack.pop()
        steps += 1
        if steps > 8:
            return False
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
        if variable is not None:
            if id(variable) not in params:
                return False
            continue
        parents = [fn for fn, _ in node.next_functions if fn is not None]
        if not parents:
            return False
        stack.extend(parents)
    return True


def _walk(roots, visited: set) -> list:
    """Autograd nodes reachable from `roots` (tensors) not yet in `visited`; marks them visited."""
    stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    found = []
    while stack:
        node = stack.pop()
        if node in visited:
            continue
        visited.add(node)
        found.append(node)
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return found


def _context_tensors(node) -> list[torch.Tensor]:
    """Tensors an autograd.Function keeps as plain context attributes (not via save_for_backward)."""
    held = []
    for value in getattr(node, "__dict__", {}).values():
        values = value if isinstance(value, (list, tuple)) else (value,)
        held.extend(v for v in values if isinstance(v, torch.Tensor))
    return held


class _Writes(TorchDispatchMode):
    """Adds the bytes of each new storage an op returns to the current part; casts of parameters apart."""

    def __init__(self, result: BlockMemory, part: list[str], param_storages: set):
        super().__init__()
        self.result, self.part, self.params = result, part, param_storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        if func is torch.ops.aten._to_copy.default and inputs <= self.params:
            return out  # autocast's weight copy: counted with the weights, not the activations
        fresh = {_storage_key(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)} - inputs
        self.result.written[self.part[-1]] += sum(nbytes for _, nbytes in fresh)
        return out


def measure_block(block: nn.Module, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int],
                  skip: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None,
                  backward: bool = True) -> BlockMemory:
    """Count what `block(x, c, grid, skip)` saves and writes (module docstring), then run its backward.

    x (N, T, D) and skip should require grad, as the outputs of earlier blocks do; c (N, D) too.
    autocast_dtype: run under autocast in that dtype (None: the tensors' own dtype).
    """
    result = BlockMemory(batch=x.shape[0])
    params = {id(p) for p in block.parameters()}
    param_storages = {_storage_key(p) for p in block.parameters()}
    part = ["other"]
    counted: set[tuple[int, int]] = set()
    visited: set = set()

    def count(t: torch.Tensor, where: str) -> None:
        key = _storage_key(t)
        if key in counted or key in param_storages:
            return
        counted.add(key)
        if _is_parameter_cast(t, params):
            result.weight_casts += key[1]
        else:
            result.saved[where] += key[1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(t, part[-1])
        return t

    def enter(name: str):
        def hook(module, args):
            _walk(args, visited)  # what ran before this part is not this part's
            part.append(name)
        return hook

    def leave(module, args, out):
        name = part.pop()
        for node in _walk([out], visited):
            for t in _context_tensors(node):
                count(t, name)

    hooks = []
    for name in ("mixer", "mlp"):
        module = getattr(block, name, None)
        if module is not None:
            hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    device = x.device.type
    flops = flop_counter()
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            stack.enter_context(flops)
            stack.enter_context(_Writes(result, part, param_storages))
            stack.enter_context(torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else nullcontext())
            out = block(x, c, grid, skip)
    finally:
        for h in hooks:
            h.remove()
    for node in _walk([out], visited):
        for t in _context_tensors(node):
            count(t, "other")
    n = x.shape[0]
    scans = [m for m in block.modules() if isinstance(m, GSPNMixer)]
    scan = sum(m.scan_flops(n, grid) for m in scans)
    result.flops_forward = flops.get_total_flops() + scan
    if backward:
        with flop_counter() as flops:
            out.float().square().mean().backward()
        # the scan's backward (adjoint scan and gate gradients) costs about twice its forward, plus
        # one more forward when the mixer recomputes it
        recomputed = sum(m.scan_flops(n, grid) for m in scans if m.recompute)
        result.flops_backward = flops.get_total_flops() + 2 * scan + recomputed
    return result


def block_inputs(block: nn.Module, batch: int, grid: tuple[int, int], width: int,
                 device: str | torch.device = "cpu", seed: int = 0):
    """Random (x, c, skip) for `block` that require grad, as a block inside a model sees them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = grid[0] * grid[1]
    x = torch.randn(batch, tokens, width, generator=gen, device=device).requires_grad_()
    c = torch.randn(batch, width, generator=gen, device=device).requires_grad_()
    skip = None
    if getattr(block, "skip_linear", None) is not None:
        skip = torch.randn(batch, tokens, width, generator=gen, device=device).requires_grad_()
    return x, c, skip
