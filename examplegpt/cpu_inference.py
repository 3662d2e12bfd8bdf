"""Fast inference on CPU: Linear weights packed once in oneDNN's layout, and a float32 cache for bfloat16 models.

A decode step multiplies one row per sequence by every weight matrix, so its speed is how fast the
weights stream through the cores. PyTorch's default CPU product for a weight in nn.Linear's row-major
layout (MKL) streams it well below what the memory allows; oneDNN, with the weight reordered once
into its own blocked layout, streams it several times faster (GPT-2's LM head, one row by
384 x 50,304 in float32 on a 2-core EPYC: 4.7 ms -> 1.3 ms; bench_decode_parts.py). The packed layout
is the one PyTorch's compiler (Inductor, with freezing) gives Linear weights on CPU; here it is used
in eager mode, for the length of a generation, leaving the model itself untouched.

The packed copy of a weight is kept (one per Linear, for the life of the model; it costs as much
memory as the weights) and made again only when the weight changes: in place (its version counter
moves), or replaced (`.to(...)`). Weights made under torch.inference_mode have no version counter:
they are packed afresh each time.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# The number of rows oneDNN is told to expect, which picks the layout; any number still works. In float32
# a hint of 1 picks a layout 1.2x slower for one row and 1.7x for eight (LM head; bench_decode_parts.py).
ROWS_HINT = 64

# Linear -> (what the weight was when packed, the packed weight)
_packed_weights: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def kv_cache_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype to keep keys and values in for a model computing in `dtype` on `device`.

    On CPU, attention of one new token over a bfloat16 cache is 4-8x slower than over a float32 one
    (batch 8, 141 and 1,000 positions: bench_decode_parts.py), so a bfloat16 model keeps a float32 cache.
    """
    return torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 else dtype


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN is in this PyTorch build, works, and takes this weight (CPU, float32 or bfloat16)."""
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and _onednn_packs_right()


@functools.cache
def _onednn_packs_right() -> bool:
    """The two (private) oneDNN ops exist in this build and compute what F.linear does, tried once.

    They are what PyTorch's compiler emits, not a public API: a PyTorch whose ops differ is run unpacked.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        weight, bias, x = torch.randn(24, 16), torch.randn(24), torch.randn(3, 16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
        return torch.allclose(_packed_forward(packed, bias, x), F.linear(x, weight, bias), atol=1e-4)
    except (RuntimeError, TypeError, AttributeError):
        return False


def packed_weight(linear: nn.Linear) -> torch.Tensor:
    """`linear.weight` (out, in) in oneDNN's layout, packed on first use and again after any change."""
    weight = linear.weight
    if weight.is_inference():  # made under torch.inference_mode: no version counter to tell a change by
        return torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
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
    """Within the block, each nn.Linear of `model` that oneDNN can take multiplies by its packed weight.

    For inference only (the packed product has no gradient). Elsewhere, or where oneDNN cannot take
    the weights (CUDA, MPS, float16, a build without it), the model runs as it is.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and can_pack(m.weight)]
    for linear in linears:
        bias = None if linear.bias is None else linear.bias.detach()
        linear.forward = partial(_packed_forward, packed_weight(linear), bias)  # shadows the class's forward
    try:
        yield
    finally:
        for linear in linears:
            del linear.forward
