"""Training batches: seeded, shuffled windows of a memory-mapped token file, resumable and shardable."""

from __future__ import annotations

import numpy as np

from ..errors import UserError


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens, served in a seeded, shuffled order per epoch.

    Window i covers tokens [i * seq_len, i * seq_len + seq_len + 1): inputs are its first seq_len
    tokens, targets its last seq_len. A global batch is `batch_size` consecutive windows of the
    epoch's permutation; data-parallel rank r takes its own contiguous slice of them, so ranks never
    overlap and the order does not depend on the number of ranks. The position in the data is just
    (epoch, batch index): saving those two integers is enough to resume exactly.
    """

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < batch_size:
            raise UserError(
                f"a batch of {batch_size} sequences of {seq_len} tokens needs {batch_size * seq_len + 1:,} tokens, "
                f"but this split has {len(tokens):,}: lower --batch-size or --max-seq-len"
            )
        if batch_size % world_size:
            raise UserError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        self.batches_per_epoch = self.num_windows // batch_size
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (x, y) of global batch `index` of `epoch`: two (batch_size / world_size, seq_len) arrays."""
        per_rank = self.batch_size // self.world_size
        first = index * self.batch_size + self.rank * per_rank
        windows = self.order(epoch)[first : first + per_rank]
        rows = np.stack([self.tokens[w * self.seq_len : w * self.seq_len + self.seq_len + 1] for w in windows])
        rows = rows.astype(np.int64)  # (b, seq_len + 1)
        return rows[:, :-1], rows[:, 1:]
