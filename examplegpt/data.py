"""Text in, tokens out: corpora from the Hugging Face hub or local files, a verified token cache, batches.

`prepare()` turns a corpus into one flat uint16 token file per split (documents joined by
<|endoftext|>) plus a `manifest.json`, written into a temporary folder and renamed into place, so a
run killed at any moment never leaves a cache that looks complete. `TokenWindows` serves training
windows from those files through a memory map, in a seeded order whose position can be saved.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import DataConfig
from .errors import UserError
from .tokenizer import EOT_ID, TOKENIZER_ID, get_tokenizer

FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit in 16 bits: half the disk and bandwidth of int32
SHORT_NAMES = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
}
WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")  # ' = Title = ' starts an article; ' = = Section = = ' does not
SEGMENT_CHARS = 1 << 20  # long documents are cut into ~1 MB pieces so all threads get work
READ_BYTES = 8 << 20  # local text files are read in blocks of this size
BATCH_CHARS = 4 << 20  # text handed to the tokenizer threads at once
HOLDOUT_SEED = 20261125


# --- sources --------------------------------------------------------------------------------------


@dataclass
class Source:
    """A resolved corpus: local text files, or a dataset that the `datasets` library loads."""

    kind: str  # "text" or "hf"
    name: str  # what the user wrote
    files: list[Path] | None = None  # kind == "text"
    dataset: str | None = None  # kind == "hf": hub id or local folder
    dataset_config: str | None = None

    def identity(self) -> dict:
        """What the cache key depends on: the files' sizes and times, or the dataset's id."""
        if self.kind == "text":
            return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]}
        return {"dataset": self.dataset, "config": self.dataset_config}


def resolve_source(cfg: DataConfig) -> Source:
    name = cfg.data
    if name in SHORT_NAMES:
        dataset, config = SHORT_NAMES[name]
        return Source("hf", name, dataset=dataset, dataset_config=cfg.data_config or config)
    path = Path(name)
    if any(ch in name for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(name, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"no files match {name}")
        return Source("text", name, files=files)
    if path.is_file():
        return Source("text", name, files=[path])
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or any(path.rglob("*.parquet")) or any(path.rglob("*.arrow")):
            return Source("hf", name, dataset=str(path), dataset_config=cfg.data_config)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".text", ".md"))
        if not files:
            raise UserError(f"{name} has no .txt files (nor parquet/arrow files of a Hugging Face dataset)")
        return Source("text", name, files=files)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix in (".txt", ".text", ".md"):
        raise UserError(f"no such file or folder: {name}")  # a hub id is 'name' or 'owner/name'
    return Source("hf", name, dataset=name, dataset_config=cfg.data_config)


class ReplacementCounter:
    """A codecs error handler that replaces undecodable bytes with U+FFFD and counts them."""

    def __init__(self) -> None:
        self.count = 0
        self.name = f"examplegpt-count-{id(self)}"
        codecs.register_error(self.name, self)

    def __call__(self, error: UnicodeDecodeError) -> tuple[str, int]:
        self.count += error.end - error.start
        return "\ufffd", error.end


def split_document(text: str, size: int | None = None) -> list[str]:
    """Cut a long text into pieces of about `size` characters that tokenize exactly as the whole.

    A cut is made only after a single newline that sits between two non-space characters: GPT-2's
    pre-tokenizer always ends a piece there, so no BPE merge can cross the cut.
    """
    size = size or SEGMENT_CHARS
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) - 1 and not (
            text[cut - 1] == "\n" and not text[cut - 2].isspace() and not text[cut].isspace()
        ):
            cut += 1
        if cut >= len(text) - 1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


Piece = tuple[str, bool]  # a piece of a document's text, and whether it ends the document


def document_pieces(documents: Iterator[str]) -> Iterator[Piece]:
    """Each non-empty document as pieces that tokenize exactly as the whole (see split_document)."""
    for doc in documents:
        if doc:
            pieces = split_document(doc)
            for i, piece in enumerate(pieces):
                yield piece, i == len(pieces) - 1


def text_file_pieces(files: list[Path], counter: ReplacementCounter) -> Iterator[Piece]:
    """Each file is one document, read in blocks (so a huge file never sits in memory whole) and decoded
    as UTF-8, undecodable bytes replaced with U+FFFD and counted."""
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")(errors=counter.name)
        pending = ""
        try:
            with open(path, "rb") as f:
                while block := f.read(READ_BYTES):
                    pieces = split_document(pending + decoder.decode(block))
                    yield from ((piece, False) for piece in pieces[:-1])
                    pending = pieces[-1]
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        pieces = [p for p in split_document(pending + decoder.decode(b"", final=True)) if p]
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hf_splits(source: Source, cfg: DataConfig) -> dict:
    """The dataset's splits, through `datasets` (from the hub, its local cache, or a local folder)."""
    if not Path(source.dataset).exists() and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # use a cached download if there is one, without retries
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        if Path(source.dataset, "dataset_dict.json").exists():
            splits = datasets.load_from_disk(source.dataset)
        else:
            splits = datasets.load_dataset(source.dataset, source.dataset_config)
    except (ConnectionError, OSError) as e:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or "Couldn't reach" in str(e):
            raise UserError(
                f"cannot reach the Hugging Face hub to download {source.name}; "
                "train on local text instead, e.g. --data 'path/to/*.txt'"
            ) from None
        raise UserError(f"cannot load dataset {source.name}: {str(e).splitlines()[0]}") from None
    except (ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"cannot load dataset {source.name}: {str(e).splitlines()[0]}") from None
    if not isinstance(splits, datasets.DatasetDict):
        splits = datasets.DatasetDict({cfg.train_split: splits})
    if cfg.train_split not in splits:
        raise UserError(f"{source.name} has no split {cfg.train_split!r} (it has {', '.join(splits)})")
    if cfg.text_column not in splits[cfg.train_split].column_names:
        columns = ", ".join(splits[cfg.train_split].column_names)
        raise UserError(f"{source.name} has no text column {cfg.text_column!r} (columns: {columns}); set --text-column")
    return splits


def hf_documents(split, text_column: str, wikitext: bool) -> Iterator[str]:
    """Rows of a dataset split as documents; WikiText's rows are lines, grouped into articles."""
    article: list[str] = []
    for batch in split.iter(batch_size=2048):
        for text in batch[text_column]:
            if text is None:
                continue
            if not wikitext:
                if text:
                    yield text
                continue
            if WIKITEXT_TITLE.match(text) and any(line.strip() for line in article):
                yield "".join(article)
                article = []
            article.append(text)
    if any(line.strip() for line in article):
        yield "".join(article)


# --- tokenizing into the cache ---------------------------------------------------------------------


# str.split()'s ASCII separators; a word starts at a non-separator byte after a separator (or at the start)
SEPARATOR_BYTES = np.zeros(256, dtype=bool)
SEPARATOR_BYTES[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True


def count_words(encoded: bytes) -> int:
    """Whitespace-separated words in UTF-8 text, vectorised (the same as len(text.split()) for ASCII spaces)."""
    separator = SEPARATOR_BYTES[np.frombuffer(encoded, dtype=np.uint8)]
    if separator.size == 0:
        return 0
    return int((~separator[1:] & separator[:-1]).sum()) + int(not separator[0])


def tokenize_to_file(pieces: Iterator[Piece], path: Path, workers: int, progress: tqdm | None) -> dict[str, int]:
    """Tokenize document pieces with `workers` threads, streaming uint16 ids to `path`, <|endoftext|>
    after each document.

    The tokenizer works on one batch of pieces in the background while this thread reads and counts
    the next one and writes the previous one. Returns counts of tokens, documents, and the text's
    whitespace-separated words and UTF-8 bytes (the denominators of word-level perplexity and bits
    per byte).
    """
    encoding = get_tokenizer()
    stats = dict(tokens=0, documents=0, words=0, bytes=0)
    eot = np.asarray([EOT_ID], dtype=TOKEN_DTYPE).tobytes()
    with open(path, "wb") as out, ThreadPoolExecutor(max_workers=1) as background:

        def write(job) -> None:
            future, ends, chars = job
            for ids, end in zip(future.result(), ends):
                out.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
                if end:
                    out.write(eot)
                stats["tokens"] += len(ids) + end
            if progress is not None:
                progress.update(chars)
                progress.set_postfix(tokens=f"{stats['tokens']:,}")

        pending = None  # the batch being tokenized
        texts, ends, chars = [], [], 0
        for text, end in pieces:
            encoded = text.encode("utf-8", errors="replace")
            stats["documents"] += end
            stats["words"] += count_words(encoded)
            stats["bytes"] += len(encoded)
            texts.append(text)
            ends.append(end)
            chars += len(text)
            if chars >= BATCH_CHARS:
                job = (background.submit(encoding.encode_ordinary_batch, texts, num_threads=workers), ends, chars)
                if pending is not None:
                    write(pending)
                pending = job
                texts, ends, chars = [], [], 0
        if pending is not None:
            write(pending)
        if texts:
            write((background.submit(encoding.encode_ordinary_batch, texts, num_threads=workers), ends, chars))
        out.flush()
        os.fsync(out.fileno())
    return stats


def file_crc32(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def hold_out(all_path: Path, train_path: Path, val_path: Path, fraction: float, min_tokens: int) -> tuple[int, int]:
    """Split a token file into train and a seeded contiguous validation span: (train tokens, val tokens)."""
    tokens = np.memmap(all_path, dtype=TOKEN_DTYPE, mode="r")
    n = len(tokens)
    n_val = max(math.ceil(n * fraction), min_tokens)
    if n - n_val < min_tokens:
        raise UserError(
            f"the corpus has {n:,} tokens: too short to hold out a validation block and still train on "
            f"{min_tokens:,}-token windows (use a shorter --max-seq-len or more text)"
        )
    start = int(np.random.default_rng(HOLDOUT_SEED).integers(0, n - n_val + 1))
    for path, spans in ((val_path, [(start, start + n_val)]), (train_path, [(0, start), (start + n_val, n)])):
        with open(path, "wb") as out:
            for a, b in spans:
                for i in range(a, b, 1 << 24):
                    out.write(tokens[i : min(b, i + (1 << 24))].tobytes())
            out.flush()
            os.fsync(out.fileno())
    del tokens
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
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.name.rstrip("/")).name or "corpus")[:40]
    return Path(cfg.cache_dir) / f"{slug}-{digest}"


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
        if not pid_alive(int(stale.name.rsplit("-", 1)[1])):
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
    counter = ReplacementCounter()
    splits: dict[str, dict] = {}
    held_out = False
    if source.kind == "text":
        inputs = {"all": (text_file_pieces(source.files, counter), sum(f.stat().st_size for f in source.files))}
    else:
        hf = load_hf_splits(source, cfg)
        wikitext = "wikitext" in source.dataset.lower()
        names = {cfg.train_split: "train", cfg.val_split: "val", cfg.test_split: "test"}
        inputs = {
            names[s]: (document_pieces(hf_documents(hf[s], cfg.text_column, wikitext)), None) for s in names if s in hf
        }
        if "val" not in inputs:
            inputs["all"] = inputs.pop("train")
    start = time.perf_counter()
    for split, (pieces, total_chars) in inputs.items():
        with tqdm(
            total=total_chars, unit="B", unit_scale=True, desc=f"tokenizing {split}", disable=not sys.stderr.isatty()
        ) as bar:
            splits[split] = tokenize_to_file(pieces, tmp / f"{split}.bin", workers, bar)
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
        info["crc32"] = file_crc32(tmp / f"{split}.bin")
    seconds = time.perf_counter() - start
    if counter.count:
        log(f"warning: {counter.count:,} bytes were not valid UTF-8 and were replaced with U+FFFD")
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": source.name,
        "source_identity": source.identity(),
        "tokenizer": TOKENIZER_ID,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "validation_held_out": held_out,
        "invalid_utf8_bytes": counter.count,
        "seconds": round(seconds, 3),
        "splits": splits,
    }
    manifest["checksum"] = manifest_checksum(manifest)
    return manifest


def open_split(folder: Path, split: str) -> np.memmap:
    """The tokens of one split, memory-mapped (nothing is read into RAM up front)."""
    return np.memmap(folder / f"{split}.bin", dtype=TOKEN_DTYPE, mode="r")


# --- batches ----------------------------------------------------------------------------------------


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
