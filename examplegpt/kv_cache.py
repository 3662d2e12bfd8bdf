"""The key/value cache: what generation keeps between forward passes, so that a new token costs one position.

Each attention layer gets a `LayerKVCache`, and the attention calls its one method, `attend`: it
stores the new keys and values, and attends from the new queries over every position the row has
seen. `KVCache` holds the layers' caches and how many positions each row (sequence) has written.

Rows may be at different lengths: the batching engine decodes many requests at once, each at its
own position. Each row's new tokens are written after its own last position, and a query attends
only to its own row's keys up to its own position (a boolean mask over the keys); keys past a
row's length are zeros or stale and are masked out.

The cache may keep keys and values in a wider dtype than the model computes in: the caller picks
it (see `cpu_inference.kv_cache_dtype`), and `attend` computes in the cache's dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import GPTConfig


def without_cudnn_attention() -> contextlib.AbstractContextManager:
    """On a GPU, the attention kernels the process has switched on, less cuDNN's: cuDNN plans its kernel
    for each shape, and the cached keys grow by one each step, so it would plan on every step (40 ms a
    call on an H200, BENCHMARKS.md). The switches are process-wide while the block runs."""
    enabled = {
        SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
        SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
        SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
    }
    others = [backend for backend, on in enabled.items() if on]
    if not torch.backends.cuda.cudnn_sdp_enabled() or not others:  # nothing to leave out, or nothing else left
        return contextlib.nullcontext()
    return sdpa_kernel(others)


class KVCache:
    """Keys and values of every layer for a batch of rows (sequences), each row at its own length."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor) -> None:
        self.layers = [LayerKVCache(self, k, v) for k, v in zip(keys, values)]  # one per block
        self.lengths = lengths  # (B,) positions written per row; on the CPU, as it is read every step
        self.max_len = keys[0].shape[2]
        self.device = keys[0].device
        # Set by `reserve` for the layers of one forward pass (see there)
        self.start: int | None = None
        self.positions = torch.zeros(len(lengths), 0, dtype=torch.long)
        self.visible = 0
        self.mask: torch.Tensor | None = None
        self.is_causal = False

    @classmethod
    def allocate(
        cls,
        config: GPTConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_len: int | None = None,
    ) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` positions (default: the context)."""
        max_len = config.max_seq_len if max_len is None else max_len
        shape = (batch_size, config.num_heads, max_len, config.d_model // config.num_heads)  # (B, nh, T_max, hs)
        # zeros, not empty: a masked-out key must still be a finite number (0 * NaN would be NaN)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        return cls(keys, values, torch.zeros(batch_size, dtype=torch.long))

    def reserve(self, T: int) -> torch.Tensor:
        """Claim the next T positions of every row for one forward pass; returns their position ids (B, T).

        Sets what the layers' `attend` needs: where to write (`start` when every row is at one
        length, else `positions`), how many keys to read (`visible`), and which of them each query
        may see (`is_causal`, or a `mask` (B, 1, T, visible); neither when every key is visible).
        """
        first, last = int(self.lengths.min()), int(self.lengths.max())
        if last + T > self.max_len:
            raise ValueError(f"sequence of {last + T} tokens is longer than the cache's {self.max_len} positions")
        self.positions = (self.lengths[:, None] + torch.arange(T)).to(self.device)  # (B, T)
        self.start = first if first == last else None
        self.visible = last + T
        self.mask, self.is_causal = None, False
        if first == last == 0:  # every row starts afresh: plain causal attention
            self.is_causal = True
        elif first != last or T > 1:  # rows at different lengths, or a chunk after cached positions
            keys = torch.arange(self.visible, device=self.device)  # (S,)
            self.mask = keys <= self.positions[:, None, :, None]  # (B, 1, T, S): key j <= the query's position
        # else: one new token per row, every row at one length: it sees all the keys
        self.lengths += T
        return self.positions

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache of their own, sharing this one's memory (writes show in both)."""
        keys = [layer.k[start:stop] for layer in self.layers]
        values = [layer.v[start:stop] for layer in self.layers]
        return KVCache(keys, values, self.lengths[start:stop])

    def copy_row(self, row: int, source: KVCache, source_row: int) -> None:
        """Make `row` hold what `source_row` of `source` holds (its written positions)."""
        n = int(source.lengths[source_row])
        for mine, theirs in zip(self.layers, source.layers):
            mine.k[row, :, :n] = theirs.k[source_row, :, :n]
            mine.v[row, :, :n] = theirs.v[source_row, :, :n]
        self.lengths[row] = n


class LayerKVCache:
    """One attention layer's keys and values, (B, nh, T_max, hs) each."""

    def __init__(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache = cache  # where this forward pass writes, and what each query may see
        self.k, self.v = k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new keys and values k, v (B, nh, T, hs), then attend from q (B, nh, T, hs) over
        each row's keys so far: (B, nh, T, hs), in q's dtype."""
        cache = self.cache
        if cache.start is not None:  # every row at one length: the new keys go in one slice
            self.k[:, :, cache.start : cache.visible] = k
            self.v[:, :, cache.start : cache.visible] = v
        else:  # each row at its own position: [rows, :, positions] addresses (B, T, nh, hs)
            rows = torch.arange(q.shape[0], device=q.device)[:, None]  # (B, 1)
            self.k[rows, :, cache.positions] = k.transpose(1, 2).to(self.k.dtype)
            self.v[rows, :, cache.positions] = v.transpose(1, 2).to(self.v.dtype)
        keys, values = self.k[:, :, : cache.visible], self.v[:, :, : cache.visible]  # (B, nh, S, hs)
        with without_cudnn_attention() if q.is_cuda else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q.to(keys.dtype), keys, values, attn_mask=cache.mask, is_causal=cache.is_causal
            )
        return y.to(q.dtype)
