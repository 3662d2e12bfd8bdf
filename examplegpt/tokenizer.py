"""GPT-2's byte-level BPE through tiktoken, built from a ranks file shipped inside the package.

tiktoken would otherwise download the ranks from a host that firewalled machines cannot reach.
The file is `r50k_base` (GPT-2's encoding) and is checked against tiktoken's published hash.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

RANKS_FILE = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base
EOT = "<|endoftext|>"
EOT_ID = 50256
TOKENIZER_ID = f"gpt2-r50k_base-{RANKS_SHA256[:16]}"  # stored with caches and checkpoints


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 Encoding; raises ValueError if the shipped ranks file does not match its hash."""
    # Read and checked here rather than by tiktoken.load, which skips the hash check when its cache is off.
    contents = RANKS_FILE.read_bytes()
    if hashlib.sha256(contents).hexdigest() != RANKS_SHA256:
        raise ValueError(f"Hash mismatch: {RANKS_FILE} is not GPT-2's r50k_base ranks file; reinstall examplegpt")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in contents.splitlines())}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=50257,
    )


def encode(text: str, allow_eot: bool = True) -> list[int]:
    """Token ids of `text`; with allow_eot the literal '<|endoftext|>' becomes the special token."""
    return get_tokenizer().encode(text, allowed_special={EOT} if allow_eot else set(), disallowed_special=())


def encode_ordinary_array(text: str) -> np.ndarray:
    """Token ids of `text`, the literal '<|endoftext|>' included, as plain text: tiktoken's
    encode_ordinary, returned as a uint32 array without building a Python list of ints."""
    return get_tokenizer().encode_to_numpy(text, disallowed_special=())


def decode(tokens: list[int]) -> str:
    return get_tokenizer().decode(tokens)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used in its vocab.json and merges.txt."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair that BPE merged to make `token`: run BPE on its bytes with only the lower-ranked merges."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        candidates = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(candidates)
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def write_hf_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt in Hugging Face's GPT-2 format, derived from the shipped ranks (no download)."""
    import json

    encoding = get_tokenizer()
    ranks = encoding._mergeable_ranks
    show = byte_to_unicode()
    text = lambda token: "".join(show[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT] = EOT_ID
    merges = [merge_of(token, ranks) for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "model_max_length": 1024}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", **special}))
