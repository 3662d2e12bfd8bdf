"""GPT-2, exactly: token + learned position embeddings, pre-LayerNorm transformer blocks, tied LM head.

Parameter names follow Hugging Face's GPT2LMHeadModel (`wte`, `c_attn`, `c_proj`, `ln_f`, ...) so that
importing their weights is a transpose and a copy (see `weights.py`). This module is single-device and
plain: mixed precision, gradient checkpointing, compile and data parallelism are applied from outside.
Generation passes a key/value cache (`kv_cache.py`) so that each new token costs one position.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .kv_cache import KVCache, LayerKVCache
from .loss import fused_linear_cross_entropy


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.d_model, config.d_model)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
        if cache is None:  # each position attends to itself and the positions before it
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, nh, T, hs)
        else:  # generation: keep k, v, and attend over every position this sequence has seen
            y = cache.attend(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.d_model)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, d_ff); GPT-2 used the tanh approximation
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2: token and position embeddings, `num_layers` blocks, a final LayerNorm, and the LM head.

    The vocabulary is padded to a multiple of `vocab_pad_multiple` (a 50,304-row matrix multiplies
    faster than a 50,257-row one). The padding rows are zero, no token id looks them up, and their
    logits are cut off in `logits` (and in the fused loss), so the model computes GPT-2 exactly.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.d_model),
                wpe=nn.Embedding(config.max_seq_len, config.d_model),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.num_layers)]),
                ln_f=nn.LayerNorm(config.d_model, eps=1e-5),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        with torch.no_grad():  # the vocabulary's padding rows (see above)
            self.transformer.wte.weight[config.vocab_size :].zero_()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            # Each block adds two residual branches; scaling their output projections by
            # 1/sqrt(2 * num_layers) keeps the residual stream's variance flat with depth (GPT-2 paper).
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.num_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self, include_position_embeddings: bool = True) -> int:
        """Trainable parameters, not counting the vocabulary's padding rows."""
        total = sum(p.numel() for p in self.parameters())
        total -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.d_model
        if not include_position_embeddings:
            total -= self.transformer.wpe.weight.numel()
        return total

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, None) for token ids `idx` (B, T); or, given `targets` (B, T; -1 is ignored), (None, loss).

        The logits are (B, T, vocab_size). The loss is the mean cross-entropy, fused with the LM head and
        computed in chunks of rows (see `loss.py`), so the (B, T, vocab) float32 logits never exist at once.
        """
        h = self.hidden_states(idx)  # (B, T, C)
        if targets is None:
            return self.logits(h), None
        return None, fused_linear_cross_entropy(h, self.lm_head.weight, targets, self.config.vocab_size)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final (LayerNormed) residual stream for token ids `idx` (B, T): (B, T, C).

        With a cache, each row's tokens continue that row where it stopped, at its own position.
        """
        B, T = idx.shape
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len {self.config.max_seq_len}")
            pos = torch.arange(T, device=idx.device)  # (T,)
            layer_caches = [None] * len(self.transformer.h)
        else:
            pos = cache.reserve(T)  # (B, T)
            layer_caches = cache.layers
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block, layer_cache in zip(self.transformer.h, layer_caches):
            x = block(x, layer_cache)
        return self.transformer.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary for hidden states (..., C): (..., vocab_size)."""
        return self.lm_head(h)[..., : self.config.vocab_size]
