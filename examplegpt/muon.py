"""Muon's Newton-Schulz iterations in float32, for CPUs where bf16 is slow.

torch.optim.Muon (torch >= 2.9) orthogonalizes each update in bf16. A CPU without native bf16 matrix
instructions (no AVX512-BF16 or AMX: AMD Zen 3, most laptops) converts every bf16 product to float32 and
back, so there the iterations cost ~20x what they cost in float32 and dominate a small model's step.
Float32Muon is torch.optim.Muon with only that dtype changed: the same state (one momentum_buffer per
matrix), so checkpoints move between the two, and the same update up to bf16's rounding.
"""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr  # Muon's per-shape step scaling, as torch.optim.Muon applies it

from .device import cpu_has_native


def orthogonalize(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """torch.optim.Muon's `_zeropower_via_newtonschulz`, computing in `dtype` instead of bf16: `steps` quintic
    Newton-Schulz iterations that push every singular value of `update` towards 1 (to about 0.7-1.2)."""
    a, b, c = coefficients
    tall = update.size(0) > update.size(1)
    x = update.to(dtype).T if tall else update.to(dtype)  # (rows <= cols): the Gram matrix is the smaller side
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm = 1 (not in place: .to may not copy)
    for _ in range(steps):
        gram = x @ x.T  # (rows, rows)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # (a + b G + c G^2) x
    return x.T if tall else x


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iterations in float32 rather than bf16."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        # torch.optim.Muon's step (torch/optim/_muon.py, _single_tensor_muon) but for the iterations' dtype
        for group in self.param_groups:
            params, grads, momenta = [], [], []
            self._init_group(group, params, grads, momenta)
            lr, momentum = group["lr"], group["momentum"]
            for param, grad, buf in zip(params, grads, momenta):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"], torch.float32)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


def muon_class(device: torch.device, flags: set[str] | None = None) -> type[torch.optim.Muon]:
    """torch.optim.Muon (bf16 iterations) on GPUs and on CPUs with native bf16; Float32Muon on other CPUs
    (`flags`: the CPU's, read from the machine when None)."""
    return Float32Muon if device.type == "cpu" and not cpu_has_native("bf16", flags) else torch.optim.Muon
