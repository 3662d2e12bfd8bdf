"""Choosing the device, the number format a run computes in, and the micro-batch that fits."""

from __future__ import annotations

import contextlib
import platform
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .config import INFERENCE_PRECISIONS, precision_name
from .errors import UserError

CPU_MICRO_BATCH = 8  # on CPU, larger micro-batches do not raise throughput, only memory


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA, then Apple MPS, then CPU; an explicit device that is missing is a UserError."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UserError(f"--device {name} was asked for, but this machine has no {name.upper()} device")
    return torch.device(name)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # config.PRECISIONS


# x86 flags of bf16 and fp16 matrix instructions; without them PyTorch converts each product to fp32 and back.
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
# bf16 halves the bytes a matmul reads; that pays only for wide enough matrices: on an AMX Xeon the
# training step is slower under bf16 autocast at d_model 128 and 192, faster from 256 on (BENCHMARKS.md).
CPU_BF16_MIN_D_MODEL = 256


# The x86 flags that change which kernels PyTorch's CPU products run.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def kernel_flags() -> list[str]:
    """Which of KERNEL_FLAGS this CPU has, in their order."""
    flags = cpu_flags()
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def cpu_model() -> str:
    """The CPU's model name as Linux gives it (else what `platform` knows, else 'unknown')."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(names, None) or platform.processor() or "unknown"


def cpu_has_native(precision: str, flags: set[str] | None = None) -> bool:
    """Whether the CPU multiplies `precision` ("bf16" or "fp16") matrices natively (AVX-512 or AMX);
    `flags`: read when None."""
    return any(f in (cpu_flags() if flags is None else flags) for f in NATIVE_FLAGS[precision])


def cpu_prefers_bf16(d_model: int, flags: set[str] | None = None) -> bool:
    """bf16 autocast on CPU: only with native bf16 matmuls (AVX512-BF16 or AMX) and d_model >= CPU_BF16_MIN_D_MODEL."""
    return cpu_has_native("bf16", flags) and d_model >= CPU_BF16_MIN_D_MODEL


def pick_dtype(
    precision: str, device: torch.device, use_amp: bool = True, d_model: int = 0, flags: set[str] | None = None
) -> torch.dtype:
    """Training's compute dtype: bf16 where supported, fp16 on older GPUs; on CPU bf16 where `cpu_prefers_bf16`
    (`flags`: the CPU's, read from the machine when None), else fp32."""
    if not use_amp:
        return torch.float32
    if precision != "auto":
        return DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_prefers_bf16(d_model, flags) else torch.float32


def inference_precision(precision: str, device: torch.device) -> str:
    """What --precision (config.INFERENCE_PRECISIONS) means on `device`.

    auto is bf16 on a CUDA GPU that has it, else fp32: on CPU the exact float32 product stays the
    default, since int8 and bf16 change the output a little (perplexity within 1%, but greedy text can
    part from float32's after some tokens: BENCHMARKS.md), so they are asked for, not picked.
    Torch's names (bfloat16, ...) are taken too; any other name is a UserError.
    """
    precision = precision_name(precision, INFERENCE_PRECISIONS)
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the activations (and of the weights, but for int8's) for inference at `precision`."""
    chosen = inference_precision(precision, device)
    return torch.float32 if chosen == "int8" else DTYPES[chosen]


def prepare_for_inference(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """`model` moved to `device` in the format `precision` names, in eval mode, without gradients (in place).

    The one place where `generate`, `evaluate` and `serve` turn --precision into the model they run:
    fp32, bf16 and fp16 convert the weights; int8 keeps float32 activations and stores every Linear,
    the LM head included, as int8 (quantize.py).
    """
    chosen = inference_precision(precision, device)
    model.to(device=device, dtype=inference_dtype(chosen, device)).eval().requires_grad_(False)
    if chosen == "int8":
        from .quantize import quantize_int8

        quantize_int8(model)
    if chosen in NATIVE_FLAGS and device.type == "cpu" and not cpu_has_native(chosen):
        print(
            f"note: this CPU has no native {chosen} ({' or '.join(NATIVE_FLAGS[chosen])}): PyTorch converts each {chosen} "
            f"product to float32 and back here, so {chosen} evaluates several times slower than fp32 and decodes "
            "batches slower; one sequence at a time it can still decode faster, reading half the bytes",
            file=sys.stderr,
        )
    return model


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for `dtype` (a no-op for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Dense bf16 tensor-core peaks from the vendors' datasheets, in FLOP/s, for MFU.
GPU_PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of this GPU, or None when unknown (then no MFU is shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model, flops in GPU_PEAK_BF16_FLOPS.items():  # most specific names come first
        if model in name:
            return flops
    return None


def find_micro_batch(
    model: torch.nn.Module, per_rank: int, seq_len: int, device: torch.device, dtype: torch.dtype
) -> int:
    """The largest micro-batch dividing `per_rank` whose forward + backward fits in GPU memory."""
    candidates = [b for b in range(per_rank, 0, -1) if per_rank % b == 0]
    if device.type != "cuda":
        return next(b for b in candidates if b <= CPU_MICRO_BATCH)
    for b in candidates:
        try:
            x = torch.zeros(b, seq_len, dtype=torch.long, device=device)
            with autocast(device, dtype):
                _, loss = model(x, x)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return b
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    raise UserError(f"even a micro-batch of 1 sequence of {seq_len} tokens does not fit in GPU memory")
