"""Choosing the device and the number format a run computes in."""

from __future__ import annotations

import contextlib

import torch

from .errors import UserError


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA, then Apple MPS, then CPU; an explicit device that is missing is a UserError."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UserError(f"--device {name} was asked for, but this machine has no {name.upper()} device")
    return torch.device(name)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # config.PRECISIONS


def pick_dtype(precision: str, device: torch.device, use_amp: bool = True) -> torch.dtype:
    """Training's compute dtype: bf16 where supported, fp16 on older GPUs, fp32 on CPU unless bf16 is asked for."""
    if not use_amp:
        return torch.float32
    if precision != "auto":
        return DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype to run a model in for inference: auto is bf16 on a CUDA GPU that has it, else fp32."""
    if precision != "auto":
        return DTYPES[precision]
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


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
