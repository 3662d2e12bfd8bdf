"""The optimizer and the learning-rate schedule: small pure pieces, unit-tested."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The learning rate of step `step` (0-based) of a run of `total_steps` steps.

    With W = warmup_steps, S = total_steps, min = peak_lr * min_lr_ratio:
      step < W:                  peak_lr * (step + 1) / W                 (linear warmup)
      W <= step < S - 1:         min + (peak_lr - min) * (1 + cos(pi * (step - W) / (S - 1 - W))) / 2
      step >= max(W, S - 1):     min                                      (the last step runs at the minimum)
    A run shorter than its warmup never reaches the peak; one exactly as long reaches it only at its last
    step (`train` says so when it starts).
    """
    min_lr = peak_lr * min_lr_ratio
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if step - warmup_steps >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / decay_steps  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay the 2-D weights (matmuls, embeddings); never biases or LayerNorm parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel does the whole update in one pass over the parameters (CUDA, and CPU since torch 2.4).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        fused=fused or None,
    )


def flops_per_token(num_params: int, num_layers: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the matmuls' forward and backward, plus 12*L*d*T for attention.

    N counts every parameter except the position embeddings (the token embedding is a matmul too,
    as the tied LM head); this is the PaLM paper's estimate, as nanoGPT uses it.
    """
    return 6 * num_params + 12 * num_layers * d_model * seq_len
