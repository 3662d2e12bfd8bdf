"""An optional accelerator for inference on CPU: Linear weights packed in oneDNN's layout, for one run.

A decode step multiplies one row per sequence by every weight matrix, so its speed is how fast the
weights stream through the cores. PyTorch's default CPU product (MKL, on nn.Linear's row-major
weight) streams them well below what the memory allows; oneDNN, with the weight reordered once into
its own blocked layout, streams them several times faster (BENCHMARKS.md, "Packed weights"). The
packed layout is the one PyTorch's compiler (Inductor, with freezing) gives Linear weights on CPU;
here it is used in eager mode and applied from outside the model: the commands (`generate`,
`evaluate`, `serve`) wrap their run in `fast_cpu_inference(model)` unless told `--no-fast-cpu`,
and library functions never switch it on by themselves.

The packed copies cost as much memory as the weights, so they live only as long as the block that
made them. The packed product has no gradient: the block refuses a model that autograd would train.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# The number of rows oneDNN is told to expect, which picks the layout; any number of rows still works.
# 64 suits both one-row decode steps and batches (a hint of 1 picks a slower layout for both).
ROWS_HINT = 64

AUTOGRAD_REFUSED = (
    "fast_cpu_inference is for inference only: the packed product has no gradient, and this model has "
    "parameters that require grad while grad mode is on. Run it under torch.inference_mode() or "
    "torch.no_grad(), or call model.requires_grad_(False) first."
)


def kv_cache_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype to keep keys and values in for a model computing in `dtype` on `device`.

    On CPU, attention of one new token over a bfloat16 cache is several times slower than over a
    float32 one (BENCHMARKS.md), so a bfloat16 model keeps a float32 cache.
    """
    return torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 else dtype


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN is in this PyTorch build, works on this CPU, and takes this weight (CPU, float32 or bfloat16)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and _onednn_packs_right(weight.dtype)
    )


@functools.cache
def _onednn_packs_right(dtype: torch.dtype) -> bool:
    """The two (private) oneDNN ops exist in this build and compute what F.linear does in `dtype`, tried once.

    They are what PyTorch's compiler emits, not a public API: a PyTorch whose ops differ is run unpacked,
    and so is bfloat16 on a CPU without the instructions oneDNN's bfloat16 path needs (AVX-512 BF16 or BW).
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        weight, bias, x = (torch.randn(shape).to(dtype) for shape in ((24, 16), (24,), (3, 16)))
        packed = _pack(weight)
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        return torch.allclose(_packed_forward(packed, bias, x), F.linear(x, weight, bias), atol=tolerance)
    except (RuntimeError, TypeError, AttributeError):
        return False


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)  # (out, in), oneDNN's blocks


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (..., out)


def _weight_state(weight: torch.Tensor) -> tuple:
    """What the weight is: a change in place moves its version, a `.to(...)` its storage or dtype."""
    # a tensor made under torch.inference_mode has no version counter: only a replacement is seen
    version = None if weight.is_inference() else weight._version
    return weight.data_ptr(), version, weight.dtype, weight.shape


class PackedLinearForward:
    """The forward an nn.Linear runs inside `fast_cpu_inference`: its packed weight, packed again if it changes."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.state = _weight_state(linear.weight)
        self.packed: torch.Tensor | None = _pack(linear.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
            raise RuntimeError(AUTOGRAD_REFUSED)  # the packed product would drop the gradient silently
        state = _weight_state(weight)
        if state != self.state:
            self.state, self.packed = state, _pack(weight) if can_pack(weight) else None
        if self.packed is None:  # moved to a device or dtype oneDNN does not take
            return F.linear(x, weight, bias)
        return _packed_forward(self.packed, bias, x)


@contextlib.contextmanager
def fast_cpu_inference(model: nn.Module) -> Iterator[None]:
    """Within the block, each nn.Linear of `model` that oneDNN can take multiplies by its packed weight.

    Where oneDNN cannot take the weights (CUDA, MPS, float16, a build without it) the model runs as
    it is. Blocks nest: an inner block leaves the Linears an outer one packed to the outer one.
    Raises RuntimeError for a model autograd would train (grad mode on, parameters requiring grad).
    """
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        raise RuntimeError(AUTOGRAD_REFUSED)
    # a Linear whose forward is already shadowed belongs to an enclosing block (or to someone else)
    linears = [
        m for m in model.modules() if isinstance(m, nn.Linear) and "forward" not in vars(m) and can_pack(m.weight)
    ]
    try:
        for linear in linears:
            linear.forward = PackedLinearForward(linear)  # shadows the class's forward
        yield
    finally:
        for linear in linears:  # the packed copies go with the forwards that hold them
            vars(linear).pop("forward", None)
