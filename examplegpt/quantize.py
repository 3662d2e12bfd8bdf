"""Weight-only int8 for inference: every Linear, the LM head included, keeps int8 weights and a scale per row.

Decoding one token reads every weight once, so at small batch a step takes as long as the weights take
to stream from memory: int8 weights are a quarter of float32's bytes. Each output row j of a weight W
(out, in) is stored as round(W[j] / s[j]) with s[j] = max|W[j]| / 127, and the product is PyTorch's
own `torch.ops.aten._weight_int8pack_mm` (int8 weights times bfloat16 activations, accumulated in
float32), the kernel that serves torch's int8 weight-only path on CPU. torchao's `Int8WeightOnlyConfig`
stores the same numbers, but its CPU product converts the whole weight back to float each call, about
50 times slower than float32 here (BENCHMARKS.md, "int8 and bf16 inference").

Every row goes through that kernel, which computes each row on its own: the product adds no dependence of
a request's numbers on what else the server is decoding. Evaluation multiplies whole windows, thousands of
rows, where converting the weight back to float for the call is faster (compute-bound, not memory-bound):
`many_rows_per_call` switches a model's layers to that.
The model file is unchanged: quantization is applied at load time, from outside the model
(`device.prepare_for_inference`), like the CPU accelerator.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# Under `many_rows_per_call`: rows from which the int8 kernel (one vector at a time) loses to converting
# the weight once for the call and multiplying in float32 (BENCHMARKS.md).
DEQUANTIZE_FROM_ROWS = 16


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 (out, in) and a bfloat16 scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.dtype = weight.dtype  # what `weight` gives back
        weight = weight.detach().float()  # (out, in)
        self.out_features, self.in_features = weight.shape
        # the scale is rounded to bfloat16 first, so that the int8 values are exact for the scale used;
        # an all-zero row (the vocabulary's padding) gets a tiny scale instead of a division by zero
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.bfloat16)  # (out,)
        quantized = torch.round(weight / scales.float()[:, None]).clamp_(-128, 127).to(torch.int8)  # (out, in)
        self.register_buffer("weight_int8", quantized.contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.dequantize_many_rows = False  # else the int8 kernel for every row (see the module)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, as a float tensor (out, in): for code that reads its dtype or
        device, or needs the matrix itself (the fused loss). Built on each access."""
        return self.weight_int8.to(self.dtype) * self.scales.to(self.dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        many = self.dequantize_many_rows and rows.shape[0] >= DEQUANTIZE_FROM_ROWS
        if not many and rows.device.type == "cpu" and int8_kernel_works():
            scales = self.scales.to(torch.bfloat16)  # the kernel takes them in the activations' dtype
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight_int8, scales)
            y = y.to(x.dtype)  # (N, out)
        else:
            y = F.linear(rows, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)  # (N, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@contextlib.contextmanager
def many_rows_per_call(model: nn.Module) -> Iterator[None]:
    """While the block runs, `model`'s int8 products of DEQUANTIZE_FROM_ROWS rows or more convert the weight
    back to float for the call: faster for evaluation's windows, and a row's numbers then depend on how
    many rows share its call (a batch of windows always has the same number)."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    for layer in layers:
        layer.dequantize_many_rows = True
    try:
        yield
    finally:
        for layer in layers:
            layer.dequantize_many_rows = False


@functools.cache
def int8_kernel_works() -> bool:
    """torch's int8 weight-only product exists in this build and computes what the dequantized product does.

    It is a private op (what torch's own quantization lowers to): a build without it, or whose
    signature differs, runs every product through the dequantized path instead.
    """
    try:
        weight = torch.randint(-127, 128, (40, 32), dtype=torch.int8)
        scales = torch.rand(40).add_(0.5).to(torch.bfloat16)
        x = torch.randn(3, 32).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x, weight, scales).float()
        expected = x.float() @ (weight.float() * scales.float()[:, None]).T
        return torch.allclose(y, expected, rtol=2e-2, atol=2e-1)
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return False


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` by an Int8Linear, in place; returns the model.

    A tied LM head (GPT-2's shares the token embedding's matrix) gets an int8 copy for the product,
    while the embedding keeps its float rows for looking tokens up (one row per token, cheap to read).
    """
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear.weight, linear.bias).to(linear.weight.device))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter and buffer except the embedding tables,
    of which a step reads only one row per token."""
    embeddings = {id(t) for m in model.modules() if isinstance(m, nn.Embedding) for t in m.parameters()}
    head_shares_embedding = not isinstance(getattr(model, "lm_head", None), Int8Linear) and hasattr(model, "lm_head")
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if t is not None}
    total = sum(t.numel() * t.element_size() for key, t in tensors.items() if key not in embeddings)
    if head_shares_embedding:  # the tied head reads the whole embedding matrix each step
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total
