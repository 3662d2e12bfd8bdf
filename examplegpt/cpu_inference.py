"""Fast inference on CPU: Linear weights packed once in oneDNN's layout, and the attention kernel that suits bf16.

A decode step multiplies one row per sequence by every weight matrix, so its speed is how fast the
weights stream through the cores. PyTorch's default CPU product for a weight in nn.Linear's row-major
layout (MKL) streams it well below what the memory allows; oneDNN, with the weight reordered once
into its own blocked layout, streams it several times faster (GPT-2's LM head, one row by
384 x 50,304 in float32 on a 2-core EPYC: 4.7 ms -> 0.73 ms; see BENCHMARKS.md). The packed layout
is the one PyTorch's compiler (Inductor, with freezing) gives Linear weights on CPU; here it is used
in eager mode, for the length of a generation, leaving the model itself untouched.

The packed copy of a weight is kept (one per Linear, for the life of the model; it costs as much
memory as the weights) and made again only when the weight changes: in place (its version counter
moves), or replaced (`.to(...)`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from functools import partial

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# The number of rows oneDNN is told to expect, which picks the layout; any number still works. In float32
# a hint of 1 picks a layout 1.6x slower for one row and 2.5x for eight (LM head, 2-core EPYC); 8 and 64 tie.
ROWS_HINT = 64

# Linear -> (what the weight was when packed, the packed weight)
_packed_weights: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN is in this PyTorch build and takes this weight (CPU, float32 or bfloat16)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packed_weight(linear: nn.Linear) -> torch.Tensor:
    """`linear.weight` (out, in) in oneDNN's layout, packed on first use and again after any change."""
    weight = linear.weight
    state = (weight.data_ptr(), weight._version, weight.dtype, weight.shape)
    cached = _packed_weights.get(linear)
    if cached is None or cached[0] != state:
        cached = (state, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT))
        _packed_weights[linear] = cached
    return cached[1]


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (..., out)


@contextlib.contextmanager
def fast_cpu_inference(model: nn.Module) -> Iterator[None]:
    """Within the block, each nn.Linear of `model` that oneDNN can take multiplies by its packed weight,
    and on CPU in bfloat16 attention runs PyTorch's plain (math) kernel: for one-token queries over a
    cache its flash kernel is 2-3x slower there (batch 8, 6 heads, 141 to 1,024 keys).

    For inference only (the packed product has no gradient). Elsewhere, or where oneDNN cannot take
    the weights (CUDA, MPS, float16, a build without it), the model runs as it is.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and can_pack(m.weight)]
    for linear in linears:
        bias = None if linear.bias is None else linear.bias.detach()
        linear.forward = partial(_packed_forward, packed_weight(linear), bias)  # shadows the class's forward
    weight = next(model.parameters())
    bf16_on_cpu = weight.device.type == "cpu" and weight.dtype == torch.bfloat16
    try:
        with sdpa_kernel(SDPBackend.MATH) if bf16_on_cpu else contextlib.nullcontext():
            yield
    finally:
        for linear in linears:
            del linear.forward
