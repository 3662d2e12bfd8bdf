"""GPT-2, exactly: token + learned position embeddings, pre-LayerNorm transformer blocks, tied LM head.

Parameter names follow Hugging Face's GPT2LMHeadModel (`wte`, `c_attn`, `c_proj`, `ln_f`, ...) so that
importing their weights is a transpose and a copy (see `hf.py`). This module is single-device and
plain: mixed precision, gradient checkpointing, compile and data parallelism are applied from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .loss import fused_linear_cross_entropy


class KVCache:
    """Keys and values of every layer, preallocated for a whole generation run.

    `pos` is the number of positions already written; a forward pass with a cache appends its
    T positions at [pos, pos + T) and attends over [0, pos + T).
    """

    def __init__(self, config: GPTConfig, batch_size: int, length: int, device, dtype) -> None:
        head_dim = config.d_model // config.num_heads
        shape = (config.num_layers, 2, batch_size, config.num_heads, length, head_dim)
        self.kv = torch.empty(shape, device=device, dtype=dtype)  # (L, 2, B, nh, T_max, hs)
        self.length = length
        self.pos = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.d_model, config.d_model)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)

        if cache is None:
            is_causal, mask = True, None
        else:
            start, end = cache.pos, cache.pos + T
            cache.kv[layer, 0, :, :, start:end] = k
            cache.kv[layer, 1, :, :, start:end] = v
            k, v = cache.kv[layer, 0, :, :, :end], cache.kv[layer, 1, :, :, :end]  # (B, nh, end, hs)
            if T == 1:  # one new token sees every cached position
                is_causal, mask = False, None
            elif start == 0:  # prefill: plain causal attention
                is_causal, mask = True, None
            else:  # a chunk after cached positions: query i sees keys up to start + i
                is_causal = False
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)

        dropout = self.dropout if self.training else 0.0
        # (a cache may keep keys and values in a wider dtype than the model's: float32 for bfloat16 on CPU)
        y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        y = y.to(x.dtype)
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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
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
        with torch.no_grad():  # padding rows are never looked up and their logits are cut off
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
        """Trainable parameters, not counting the dead padding rows of the embedding (see vocab_pad_multiple)."""
        total = sum(p.numel() for p in self.parameters())
        total -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.d_model
        if not include_position_embeddings:
            total -= self.transformer.wpe.weight.numel()
        return total

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final (LayerNormed) residual stream for token ids `idx` (B, T): (B, T, C)."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len {self.config.max_seq_len}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary for hidden states (..., C): (..., vocab_size)."""
        return self.lm_head(h)[..., : self.config.vocab_size]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, given `targets` (B, T; -100 is not scored), the mean cross-entropy.

        Training passes `return_logits=False`: the loss is then fused with the LM head and computed in
        chunks of rows, so the (B, T, vocab) float32 logits never exist at once (see `loss.py`).
        """
        h = self.hidden_states(idx)  # (B, T, C)
        if targets is None:
            return self.logits(h), None
        if not return_logits:
            return None, fused_linear_cross_entropy(h, self.lm_head.weight, targets, self.config.vocab_size)
        logits = self.logits(h)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())  # -100 not scored
        return logits, loss

    @classmethod
    def from_pretrained(cls, path: str, map_location: str | torch.device = "cpu") -> GPT:
        """Load our model file or checkpoint, a Hugging Face GPT-2 folder, or (online) a hub id such as 'gpt2'."""
        from .weights import load_model

        return load_model(path, map_location)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int = 50, **sampling) -> torch.Tensor:
        """Continue `idx` (B, T) by `max_new_tokens` tokens with a KV cache: (B, T + new). See `generate.py`."""
        from .generate import generate

        return generate(self, idx, max_new_tokens, **sampling)
