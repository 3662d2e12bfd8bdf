"""Text in, tokens out, batches served: one module per step.

- `corpus`: where text comes from (local and bundled files, Hugging Face datasets, WikiText), cut
  into pieces that tokenize exactly as the whole;
- `token_cache`: the pieces tokenized in parallel into a verified cache of uint16 token files;
- `batches`: training windows served from those files in a seeded, resumable order.
"""

from .batches import TokenWindows
from .token_cache import HOLDOUT_SEED, check_cache, open_split, prepare, tokenize_local_text

__all__ = ["HOLDOUT_SEED", "TokenWindows", "check_cache", "open_split", "prepare", "tokenize_local_text"]
