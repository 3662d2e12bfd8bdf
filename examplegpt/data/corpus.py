"""Where text comes from: local files, the bundled Tiny Shakespeare, Hugging Face datasets, WikiText.

Every source becomes a stream of pieces: strings of at most about `SEGMENT_CHARS` characters, each
marked with whether it ends a document. Pieces are cut only where GPT-2's pre-tokenizer starts a new
pre-token whatever comes before, and BPE never merges across pre-tokens, so tokenizing the pieces
one by one (in parallel) gives exactly the tokens of the whole text; and a file is read in blocks,
so no text is ever held whole in memory.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import os
import re
import socket
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from ..errors import UserError

HUB_DATASETS = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
}
BUNDLED = {"shakespeare": Path(__file__).resolve().parent.parent / "assets" / "tinyshakespeare.txt.gz"}
TEXT_SUFFIXES = (".txt", ".text", ".md")  # each also gzip-compressed: notes.txt.gz (any letter case)
# suffixes of files, never the end of a hub id
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".tgz", ".bin", ".json", ".jsonl",
                 ".csv", ".tsv", ".parquet", ".arrow", ".html", ".xml", ".pdf")  # fmt: skip
# Long texts are cut into pieces of about SEGMENT_CHARS so all threads get work. A piece is at most
# SEGMENT_CHARS + CUT_SEARCH_CHARS long, and that must stay well under 1,000,000 characters: tiktoken's
# regex engine gives up (a panic, not an exception) on a whitespace run that long followed by a non-space.
SEGMENT_CHARS = 1 << 19
CUT_SEARCH_CHARS = 1 << 16  # how far past the target a cut point is looked for before one is forced
READ_BYTES = 8 << 20  # text files are read in blocks of this size

# \s of the regex engine tiktoken uses (Unicode White_Space); Python's str.isspace() differs (U+001C..U+001F).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
ASCII_PUNCTUATION = re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
# Places where GPT-2's pattern  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# starts a pre-token whatever text precedes the place, and where the text before it pre-tokenizes the
# same when it ends there:
# - before the last whitespace character of a run that a non-space follows. A single one (as in
#   "a b") is the optional space of the next pre-token; in a longer run, \s+(?!\S) stops just before
#   it. Either way the pre-token before ends there, and a run that ends the text keeps the same
#   pre-token, since (?!\S) also holds at the end.
# - between an ASCII letter and an ASCII digit or punctuation mark, or an ASCII digit and an ASCII
#   letter or punctuation mark: \p{L}+ and \p{N}+ stop there, and no contraction ends in a digit or
#   mark. (Punctuation then letter is no cut: "'s" is one pre-token.)
SAFE_CUT = re.compile(
    rf"[{WHITESPACE}](?=[^{WHITESPACE}])"
    rf"|(?<=[A-Za-z])(?=[0-9{ASCII_PUNCTUATION}])"
    rf"|(?<=[0-9])(?=[A-Za-z{ASCII_PUNCTUATION}])"
)
WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")  # ' = Title = ' starts an article; ' = = Section = = ' does not
WIKITEXT_BLANK_LINE = " \n"  # what every blank line of the published WikiText files holds


@dataclass
class Source:
    """A resolved corpus: text files (plain or gzip), or a dataset that the `datasets` library loads."""

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

    @property
    def is_wikitext(self) -> bool:
        return self.kind == "hf" and "wikitext" in self.dataset.lower()


def resolve_source(cfg: DataConfig) -> Source:
    name = cfg.data
    if not name.strip():
        raise UserError("--data is empty: name a corpus, a file, a folder or a glob")
    if name in HUB_DATASETS:
        dataset, config = HUB_DATASETS[name]
        return Source("hf", name, dataset=dataset, dataset_config=cfg.data_config or config)
    if name in BUNDLED:
        return Source("text", name, files=[BUNDLED[name]])
    path = Path(name)
    if any(ch in name for ch in "*?[") and not path.exists():  # 'notes [draft].txt' is a file's name
        files = sorted(Path(p) for p in glob.glob(name, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"no files match {name}")
        return Source("text", name, files=files)
    if path.is_file():
        return Source("text", name, files=[path])
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or any(path.rglob("*.parquet")) or any(path.rglob("*.arrow")):
            return Source("hf", name, dataset=str(path), dataset_config=cfg.data_config)
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_text_file(p) and not hidden(p, path))
        if not files:
            raise UserError(
                f"{name} has no .txt, .text or .md files (nor parquet/arrow files of a Hugging Face dataset)"
            )
        return Source("text", name, files=files)
    # a hub id is 'name' or 'owner/name'; anything else, or a name inside a local folder, meant a path
    local_folder = path.parent != Path(".") and path.parent.is_dir()
    path_like = name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1
    if path_like or path.suffix.lower() in FILE_SUFFIXES or local_folder:
        raise UserError(f"no such file or folder: {name}")
    return Source("hf", name, dataset=name, dataset_config=cfg.data_config)


def is_text_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in TEXT_SUFFIXES or (suffix == ".gz" and Path(path.stem).suffix.lower() in TEXT_SUFFIXES)


def hidden(path: Path, folder: Path) -> bool:
    """A dot-file, or a file inside a dot-folder (.git, .ipynb_checkpoints), below `folder`."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


REPLACEMENT = "\ufffd"  # what an undecodable byte sequence becomes


class ReadReport:
    """What reading a source had to do to the text: undecodable bytes replaced with U+FFFD, and cuts
    forced where no pre-token boundary was near (the one place where pieces may not tokenize exactly
    as the whole). Also the codecs error handler that does the replacing."""

    def __init__(self) -> None:
        self.invalid_utf8_bytes = 0
        self.replacements = 0  # U+FFFD characters put in their place
        self.forced_cuts = 0
        self.error_handler = f"examplegpt-count-{id(self)}"
        codecs.register_error(self.error_handler, self._replace)

    def _replace(self, error: UnicodeDecodeError) -> tuple[str, int]:
        self.invalid_utf8_bytes += error.end - error.start
        self.replacements += 1
        return REPLACEMENT, error.end

    def bytes_read(self, decoded_utf8_bytes: int) -> int:
        """The bytes of the files, from the UTF-8 length of the text they decoded to."""
        return decoded_utf8_bytes - len(REPLACEMENT.encode()) * self.replacements + self.invalid_utf8_bytes

    def warnings(self, name: str) -> list[str]:
        lines = []
        if self.invalid_utf8_bytes:
            lines.append(
                f"warning: {self.invalid_utf8_bytes:,} bytes of {name} were not valid UTF-8 and were replaced with U+FFFD"
            )
        if self.forced_cuts:
            lines.append(
                f"warning: {self.forced_cuts:,} pieces of {name} had no pre-token boundary (a space, a letter next to "
                f"a digit or a mark) within {CUT_SEARCH_CHARS:,} characters and were cut anyway; tokens at those "
                "cuts may differ from tokenizing the text whole"
            )
        return lines


def cut_pieces(
    text: str, report: ReadReport, final: bool = True, size: int | None = None, search: int | None = None
) -> tuple[list[str], str]:
    """Cut `text` into pieces of about `size` characters at safe cut points (see SAFE_CUT).

    Returns the pieces and the rest that is too short to cut yet; with `final` (no text follows) the
    rest is the last piece instead. Where no cut point lies within `search` characters after the target
    length, the cut is forced there and counted in `report`.
    """
    size, search = size or SEGMENT_CHARS, search or CUT_SEARCH_CHARS
    pieces, start = [], 0
    while len(text) - start > size:
        target = start + size
        window_end = target + search
        match = SAFE_CUT.search(text, target, window_end + 1)  # + 1: the lookahead sees the next character
        if match is not None:
            cut = match.start()
        elif len(text) > window_end:  # none within reach: one pre-token this long cannot be split exactly
            cut = target
            report.forced_cuts += 1
        else:
            break  # a cut point may still come with more text
        pieces.append(text[start:cut])
        start = cut
    rest = text[start:]
    if final:
        return pieces + ([rest] if rest else []), ""
    return pieces, rest


Piece = tuple[str, bool]  # a piece of a document's text, and whether it ends the document


def document_pieces(documents: Iterator[str], report: ReadReport) -> Iterator[Piece]:
    """Each non-empty document as pieces that tokenize exactly as the whole."""
    for doc in documents:
        pieces, _ = cut_pieces(doc, report)
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def open_text_file(path: Path):
    """The file's bytes; gzip files are decompressed on the fly."""
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


READ_ERRORS = (OSError, EOFError, zlib.error)  # zlib.error: a damaged gzip stream
# A NUL byte in the first 8 KB marks a file as not text, as git and grep decide: text never holds one,
# while compressed data, random bytes, model weights and UTF-16 or UTF-32 (ASCII's zero high byte) all but always do.
SNIFF_BYTES = 8192


def check_text_files(files: list[Path]) -> None:
    """Refuse files that are not UTF-8 text, which decoding would turn into other characters or into
    U+FFFD: a UTF-16 or UTF-32 byte-order mark, or a NUL byte in the first SNIFF_BYTES (a binary
    file, or UTF-16 or UTF-32 without a mark)."""
    for path in files:
        try:
            with open_text_file(path) as f:
                start = f.read(SNIFF_BYTES)
        except READ_ERRORS as e:
            raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        if start.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
            raise UserError(f"{path} is UTF-16 or UTF-32 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
        if (nul := start.find(0)) >= 0:
            raise UserError(
                f"{path} is not UTF-8 text: its byte {nul:,} is NUL, a control character text never holds "
                "(a binary file, or UTF-16 or UTF-32 without a byte-order mark)"
            )


def text_file_pieces(files: list[Path], report: ReadReport) -> Iterator[Piece]:
    """Each file is one document, read in blocks (so a file of any size never sits in memory whole) and
    decoded as UTF-8 (a byte-order mark at the start dropped), undecodable bytes replaced with U+FFFD
    and counted."""
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8-sig")(errors=report.error_handler)
        rest = ""
        try:
            with open_text_file(path) as f:
                while block := f.read(READ_BYTES):
                    pieces, rest = cut_pieces(rest + decoder.decode(block), report, final=False)
                    yield from ((piece, False) for piece in pieces)
        except READ_ERRORS as e:
            raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        pieces, _ = cut_pieces(rest + decoder.decode(b"", final=True), report)
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
                ("" if source.name in HUB_DATASETS else f"there is no file or folder {source.name} here, and ")
                + f"cannot reach the Hugging Face hub to download {source.name}; "
                "use local text instead, e.g. --data shakespeare or --data 'path/to/*.txt'"
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
    """Rows of a dataset split as documents (empty rows skipped); WikiText's rows are lines, see wikitext_articles."""
    rows = (text for batch in split.iter(batch_size=2048) for text in batch[text_column] if text is not None)
    if wikitext:
        yield from wikitext_articles(rows)
    else:
        yield from (text for text in rows if text)


def wikitext_articles(rows: Iterator[str]) -> Iterator[str]:
    """The published WikiText text, article by article, from the rows of the hub's loader.

    The loader yields each line of the raw file as a row, and each blank line (" \\n" in the
    published files) as an empty row "", so blank rows are put back as they were. An article starts
    at a title line (" = Title = ") that follows a blank line: lines that look like titles inside
    an article (some formulas do) follow text, not a blank line.
    """
    article: list[str] = []
    has_text, after_blank = False, True
    for row in rows:
        line = row or WIKITEXT_BLANK_LINE
        if after_blank and has_text and WIKITEXT_TITLE.match(line):
            yield "".join(article)
            article, has_text = [], False
        article.append(line)
        after_blank = not line.strip()
        has_text = has_text or not after_blank
    if has_text:
        yield "".join(article)
