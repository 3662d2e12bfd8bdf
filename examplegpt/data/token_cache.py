"""The verified token cache: a corpus tokenized once into flat uint16 files, checked on every load.

`prepare()` turns a corpus into one token file per split (documents joined by <|endoftext|>) plus a
`manifest.json`, written into a temporary folder and renamed into place, so a run killed at any
moment never leaves a cache that looks complete. The pieces of text are tokenized by a pool of
threads while the next ones are read, and the tokens streamed to disk: memory stays the same
whatever the size of the corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import DataConfig
from ..errors import UserError
from ..tokenizer import EOT_ID, TOKENIZER_ID, encode_ordinary_array
from .corpus import (
    Piece,
    ReadReport,
    Source,
    check_text_files,
    document_pieces,
    hf_documents,
    load_hf_splits,
    resolve_source,
    text_file_pieces,
)

FORMAT_VERSION = 2
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit in 16 bits: half the disk and bandwidth of int32
BATCH_CHARS = 4 << 20  # text in flight in the tokenizer threads
COPY_TOKENS = 1 << 22  # tokens copied at a time when holding out validation
HOLDOUT_SEED = 20261125


# str.split()'s ASCII separators; a word starts at a non-separator byte after a separator (or at the start)
SEPARATOR_BYTES = np.zeros(256, dtype=bool)
SEPARATOR_BYTES[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True


def count_words(encoded: bytes, inside_word: bool = False) -> int:
    """Whitespace-separated words in UTF-8 text, vectorised (the same as len(text.split()) for ASCII
    spaces). `inside_word`: the text goes on with a word the text before it ended in, not counted again."""
    separator = SEPARATOR_BYTES[np.frombuffer(encoded, dtype=np.uint8)]
    if separator.size == 0:
        return 0
    return int((~separator[1:] & separator[:-1]).sum()) + int(not separator[0] and not inside_word)


def tokenize_to_file(
    pieces: Iterator[Piece], path: Path, workers: int, progress: tqdm | None, count_text: bool = True
) -> dict[str, int]:
    """Tokenize document pieces with `workers` threads, streaming uint16 ids to `path`, <|endoftext|>
    after each document.

    Pieces are handed to the threads as they are read, and written back in order once about
    BATCH_CHARS of text is in flight, so the threads never wait for one another and memory stays
    bounded. Returns counts of tokens, documents, and (with `count_text`) the text's
    whitespace-separated words and UTF-8 bytes, the denominators of word-level perplexity and bits
    per byte. The file is not fsynced: the caller does that to the files it keeps.
    """
    stats = dict(tokens=0, documents=0, **(dict(words=0, bytes=0) if count_text else {}))
    eot = np.asarray([EOT_ID], dtype=TOKEN_DTYPE).tobytes()
    in_flight: deque[tuple[Future, bool, int]] = deque()  # (token ids to come, ends a document, characters)
    with open(path, "wb") as out, ThreadPoolExecutor(max_workers=workers) as pool:

        def write_oldest() -> int:
            future, end, chars = in_flight.popleft()
            ids = future.result()  # (tokens,) uint32
            out.write(ids.astype(TOKEN_DTYPE).tobytes())
            if end:
                out.write(eot)
            stats["tokens"] += len(ids) + end
            if progress is not None:
                progress.update(chars)
                progress.set_postfix(tokens=f"{stats['tokens']:,}", refresh=False)
            return chars

        chars_in_flight = 0
        inside_word = False  # the last piece ended inside a word of the document it continues
        for text, end in pieces:
            stats["documents"] += end
            if count_text:
                encoded = text.encode("utf-8", errors="replace")
                stats["words"] += count_words(encoded, inside_word)
                stats["bytes"] += len(encoded)
                inside_word = not end and len(encoded) > 0 and not SEPARATOR_BYTES[encoded[-1]]
            in_flight.append((pool.submit(encode_ordinary_array, text), end, len(text)))
            chars_in_flight += len(text)
            while chars_in_flight > BATCH_CHARS:
                chars_in_flight -= write_oldest()
        while in_flight:
            write_oldest()
    return stats


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def file_crc32(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def hold_out(all_path: Path, train_path: Path, val_path: Path, fraction: float, min_tokens: int) -> tuple[int, int]:
    """Split a token file into train and a seeded contiguous validation span: (train tokens, val tokens).

    Copied through plain reads, not a memory map, whose pages would count towards resident memory."""
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    n = all_path.stat().st_size // itemsize
    n_val = max(math.ceil(n * fraction), min_tokens)
    if n - n_val < min_tokens:
        raise UserError(
            f"the corpus has {n:,} tokens: too short to hold out a validation block and still train on "
            f"{min_tokens:,}-token windows (use a shorter --max-seq-len or more text)"
        )
    start = int(np.random.default_rng(HOLDOUT_SEED).integers(0, n - n_val + 1))
    with open(all_path, "rb") as src:
        for path, spans in ((val_path, [(start, start + n_val)]), (train_path, [(0, start), (start + n_val, n)])):
            with open(path, "wb") as out:
                for a, b in spans:
                    src.seek(a * itemsize)
                    for i in range(a, b, COPY_TOKENS):
                        out.write(src.read((min(b, i + COPY_TOKENS) - i) * itemsize))
                out.flush()
                os.fsync(out.fileno())
    return n - n_val, n_val


def manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def cache_folder(cfg: DataConfig, source: Source, min_tokens: int) -> Path:
    key = {
        "source": source.identity(),
        "tokenizer": TOKENIZER_ID,
        "format": FORMAT_VERSION,
        "text_column": cfg.text_column,
        "splits": [cfg.train_split, cfg.val_split, cfg.test_split],
        "val_fraction": cfg.val_fraction,
        "min_tokens": min_tokens,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / f"{cache_slug(source.name)}-{digest}"


GLOB_PART = re.compile(r"[*?]|\[[^\]]*\]")  # a wildcard or a character class


def cache_slug(name: str) -> str:
    """A readable start for a cache folder's name: the corpus, file or folder name; for a glob, the folder
    it searches and what its pattern keeps ('books/*.txt' -> 'books_glob_txt', not '_.txt')."""
    parts = [part for part in Path(name.rstrip("/")).parts if part not in ("/", ".", "..")]
    first_glob = next((i for i, part in enumerate(parts) if GLOB_PART.search(part)), None)
    if first_glob is None or Path(name).exists():  # 'notes [draft].txt' is a file's name
        words = parts[-1] if parts else "corpus"
    else:
        folder = parts[first_glob - 1] if first_glob > 0 else Path.cwd().name or "corpus"
        pattern = GLOB_PART.sub("", "_".join(parts[first_glob:]))
        words = "_".join(w for w in (folder, "glob", re.sub(r"[^A-Za-z0-9.-]+", "_", pattern).strip("._-")) if w)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", words).strip("_")[:40] or "corpus"


def check_cache(folder: Path) -> dict:
    """The manifest of a complete, intact cache folder; raises ValueError saying what is wrong."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise ValueError("no manifest")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("manifest.json is not valid JSON") from None
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise ValueError("manifest.json checksum mismatch")
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("tokenizer") != TOKENIZER_ID:
        raise ValueError("made by another format version or tokenizer")
    for split, info in manifest["splits"].items():
        path = folder / f"{split}.bin"
        if not path.exists() or path.stat().st_size != info["tokens"] * np.dtype(TOKEN_DTYPE).itemsize:
            raise ValueError(f"{split}.bin is missing or truncated")
        if file_crc32(path) != info["crc32"]:
            raise ValueError(f"{split}.bin checksum mismatch")
    return manifest


def prepare(cfg: DataConfig, min_tokens: int, verbose: bool = False) -> Path:
    """Make sure the token cache for `cfg` exists and is intact; returns its folder."""
    log = (
        (lambda msg: print(msg, file=sys.stderr if msg.startswith("warning") else sys.stdout))
        if verbose
        else (lambda msg: None)
    )
    source = resolve_source(cfg)
    folder = cache_folder(cfg, source, min_tokens)
    if folder.exists():
        try:
            check_cache(folder)
            log(f"token cache: {folder} (found, verified)")
            return folder
        except ValueError as e:
            log(f"token cache {folder} is damaged ({e}): rebuilding it")
    build_cache(cfg, source, folder, min_tokens, log)
    return folder


def build_cache(cfg: DataConfig, source: Source, folder: Path, min_tokens: int, log) -> None:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache folder {folder.parent}: {e.strerror}") from None
    for stale in folder.parent.glob(f"{folder.name}.tmp-*"):  # left by a run that was killed
        pid = stale.name.rsplit("-", 1)[1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = write_splits(cfg, source, tmp, min_tokens, log)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():  # damaged: move it aside first, so the rename below is atomic
            stale = folder.with_name(f"{folder.name}.stale-{os.getpid()}")
            os.replace(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = ", ".join(f"{s} {i['tokens']:,} tokens" for s, i in manifest["splits"].items())
    log(f"token cache: {folder} ({summary})")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_splits(cfg: DataConfig, source: Source, tmp: Path, min_tokens: int, log) -> dict:
    workers = cfg.workers or os.cpu_count() or 1
    report = ReadReport()
    splits: dict[str, dict] = {}
    held_out = False
    if source.kind == "text":
        compressed = any(f.suffix.lower() == ".gz" for f in source.files)  # its size on disk is not its text's
        total_bytes = None if compressed else sum(f.stat().st_size for f in source.files)
        check_text_files(source.files)
        inputs = {"all": (text_file_pieces(source.files, report), total_bytes)}  # its words and bytes go unused
    else:
        hf = load_hf_splits(source, cfg)
        names = {cfg.train_split: "train", cfg.val_split: "val", cfg.test_split: "test"}
        inputs = {
            names[s]: (document_pieces(hf_documents(hf[s], cfg.text_column, source.is_wikitext), report), None)
            for s in names
            if s in hf
        }
        if "val" not in inputs:
            inputs["all"] = inputs.pop("train")
    start = time.perf_counter()
    for split, (pieces, total_chars) in inputs.items():
        with tqdm(
            total=total_chars, unit="B", unit_scale=True, desc=f"tokenizing {split}", disable=not sys.stderr.isatty()
        ) as bar:
            splits[split] = tokenize_to_file(pieces, tmp / f"{split}.bin", workers, bar, count_text=split != "all")
    if splits.get("all", splits.get("train", {"tokens": 0}))["tokens"] == 0:
        raise UserError(f"{source.name} holds no text")
    if "all" in splits:
        train_tokens, val_tokens = hold_out(
            tmp / "all.bin", tmp / "train.bin", tmp / "val.bin", cfg.val_fraction, min_tokens
        )
        (tmp / "all.bin").unlink()
        docs = splits.pop("all")["documents"]
        splits["train"] = {"tokens": train_tokens, "documents": docs}
        splits["val"] = {"tokens": val_tokens, "documents": None}  # a span of tokens: no word or byte count
        held_out = True
        log(f"{source.name} has no validation split: held out {val_tokens:,} tokens ({cfg.val_fraction:.1%}, seeded)")
    if splits["val"]["tokens"] < min_tokens:
        raise UserError(
            f"the validation split has {splits['val']['tokens']:,} tokens, fewer than one window ({min_tokens:,})"
        )
    for split, info in splits.items():
        if not held_out:  # hold_out wrote and fsynced its own files
            fsync_file(tmp / f"{split}.bin")
        info["crc32"] = file_crc32(tmp / f"{split}.bin")
    seconds = time.perf_counter() - start
    for line in report.warnings(source.name):
        log(line)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": source.name,
        "source_identity": source.identity(),
        "tokenizer": TOKENIZER_ID,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "validation_held_out": held_out,
        "invalid_utf8_bytes": report.invalid_utf8_bytes,
        "forced_cuts": report.forced_cuts,
        "seconds": round(seconds, 3),
        "splits": splits,
    }
    manifest["checksum"] = manifest_checksum(manifest)
    return manifest


def open_split(folder: Path, split: str) -> np.memmap:
    """The tokens of one split, memory-mapped (nothing is read into RAM up front)."""
    return np.memmap(folder / f"{split}.bin", dtype=TOKEN_DTYPE, mode="r")


def tokenize_local_text(cfg: DataConfig, out: Path) -> dict | None:
    """Tokenize a local-text source whole (no validation held out) into `out`, outside the cache:
    its counts of tokens, documents, words and bytes (of the files: an undecodable byte is one byte,
    not the three of the U+FFFD that replaced it), warnings on stderr; None when the source is a dataset."""
    source = resolve_source(cfg)
    if source.kind != "text":
        return None
    check_text_files(source.files)
    report = ReadReport()
    stats = tokenize_to_file(text_file_pieces(source.files, report), out, cfg.workers or 1, None)
    stats["bytes"] = report.bytes_read(stats["bytes"])
    for line in report.warnings(source.name):
        print(line, file=sys.stderr)
    return stats
