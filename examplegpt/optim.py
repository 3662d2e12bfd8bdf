"""The optimizer and the learning-rate schedule: small pure pieces, unit-tested.

Two optimizers are offered. AdamW for every parameter is the original recipe. Muon (Jordan et al. 2024,
`torch.optim.Muon`) replaces each update of a hidden weight matrix by the nearest semi-orthogonal matrix
(Newton-Schulz iterations on the momentum), so every direction of the matrix moves by the same amount;
it is defined for 2-D matrices that map one hidden space to another, so the embeddings (and the LM head
tied to them), biases and LayerNorms keep AdamW, as in modded-nanogpt and nanochat.
On a CPU without native bf16 the iterations run in float32 instead of bf16 (muon.py).
"""

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


def warmup_warning(peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> str | None:
    """What a run whose warmup is as long as the run or longer should be told at start (None: nothing)."""
    if warmup_steps < total_steps:
        return None
    if warmup_steps > total_steps:
        last_lr = lr_at(total_steps - 1, peak_lr, warmup_steps, total_steps, min_lr_ratio)
        outcome = f"never reaches {peak_lr:g} (it ends at {last_lr:.2e})"
    else:
        outcome = f"reaches {peak_lr:g} only at the last step and never decays"
    return (
        f"the run has {total_steps} steps and warmup_steps is {warmup_steps}: the learning rate {outcome};"
        " lower --warmup-steps"
    )


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay the 2-D weights (matmuls, embeddings); never biases or LayerNorm parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The blocks' 2-D weights (attention's c_attn and c_proj, the MLP's c_fc and c_proj): Muon's share."""
    return [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]


def muon_split(model: torch.nn.Module, cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(Muon's groups, AdamW's groups): the hidden matrices, then the embeddings (decayed) and the 1-D rest."""
    matrices = hidden_matrices(model)
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not m for m in matrices)]
    embeddings = [p for p in rest if p.dim() >= 2]  # wte (which is also the LM head) and wpe
    vectors = [p for p in rest if p.dim() < 2]  # biases and LayerNorm weights
    muon_groups = [{"params": matrices, "weight_decay": cfg.muon_weight_decay}]
    adamw_groups = [{"params": embeddings, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return muon_groups, adamw_groups


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, stepped as one optimizer.

    It has what the training loop, the gradient scaler and the checkpoint ask of an optimizer
    (param_groups, step, zero_grad, state_dict); the two states are saved side by side."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, closure=None) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


Optimizer = torch.optim.AdamW | MuonWithAdamW


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizer:
    # The fused kernel does the whole update in one pass over the parameters (CUDA, and CPU since torch 2.4).
    fused = device.type in ("cuda", "cpu") or None
    adamw = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), **adamw)
    muon_groups, adamw_groups = muon_split(model, cfg)
    # Muon's default step scaling (Keller Jordan's) multiplies a tall matrix's step by sqrt(rows / cols), as in
    # modded-nanogpt and nanochat, so one muon_learning_rate suits c_attn (3C x C) and c_fc (4C x C).
    # imported here: torch.optim.Muon exists from torch 2.9 on (TrainConfig checks), AdamW runs on older torch
    from .muon import muon_class

    muon = muon_class(device)(muon_groups, lr=cfg.muon_learning_rate, momentum=cfg.muon_momentum, nesterov=True)
    return MuonWithAdamW(muon, torch.optim.AdamW(adamw_groups, **adamw))


def torch_optimizers(optimizer: Optimizer) -> tuple[torch.optim.Optimizer, ...]:
    """The torch optimizers inside `optimizer` (what FSDP's state-dict functions take)."""
    return optimizer.optimizers if isinstance(optimizer, MuonWithAdamW) else (optimizer,)


def set_learning_rates(optimizer: Optimizer, lr: float, cfg: TrainConfig) -> None:
    """Set this step's rates: `lr` is lr_at's for the peak learning_rate (AdamW's); Muon's groups follow the
    same schedule from their own peak (lr_at is proportional to its peak)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if isinstance(optimizer, MuonWithAdamW):
        for group in optimizer.muon.param_groups:
            group["lr"] = lr * cfg.muon_learning_rate / cfg.learning_rate


def flops_per_token(num_params: int, num_layers: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the matmuls' forward and backward, plus 12*L*d*T for attention.

    N counts every parameter except the position embeddings (the token embedding is a matmul too,
    as the tied LM head); this is the PaLM paper's estimate, as nanoGPT uses it.
    """
    return 6 * num_params + 12 * num_layers * d_model * seq_len
