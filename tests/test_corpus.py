"""Corpus sources: pieces that tokenize exactly as the whole text (judged by tiktoken on the whole
text), streaming in blocks, WikiText exactly as published, the bundled Tiny Shakespeare."""

import gzip
import json
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examplegpt.config import DataConfig
from examplegpt.data import check_cache, corpus, open_split, prepare, token_cache
from examplegpt.data.corpus import ReadReport, cut_pieces, text_file_pieces
from examplegpt.tokenizer import EOT_ID, get_tokenizer

from .conftest import assert_one_line_error, examples, make_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT_TEST = SHARED / "wikitext-2" / "test.txt"

# The shapes that decide where GPT-2's pre-tokens end: whitespace runs of every kind (Unicode
# White_Space, and U+001C..U+001F, which Python calls space and the tokenizer does not), WikiText's
# " \n " lines, CRLF, contractions and lone apostrophes, letters, digits and marks of many scripts.
FRAGMENTS = [" ", "  ", "    ", "\n", "\n\n", " \n ", " \n", "\r\n", "\r", "\t", " \t ", "\x0b", "\x0c",
             "\x85", "\xa0", "\u1680", "\u2003", "\u2028", "\u2029", "\u202f", "\u3000", "\x1c", "\x1f",
             "\u200b", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "''", "s", "ll", "re", "the", "Zebra",
             "naïve", "e\u0301", "東京", "🚀", "Ω", "1", "2026", "٣", "Ⅻ", "½", ".", ",", "...", "_", "-", "@-@",
             " = ", " = Title = \n", "<unk>", "<|endoftext|>", "a1b2", "x.y", "3.14", "é5", "#"]  # fmt: skip
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=80).map("".join)
# a long run of one shape: thousands of spaces, blank lines, letters without a space
runs = st.tuples(texts, st.sampled_from([" ", "\n", " \n", "\r\n", "a", "é", ".", "1", "\u3000"]),
                 st.integers(1, 3000), texts).map(lambda t: t[0] + t[1] * t[2] + t[3])  # fmt: skip


def tokens_of_pieces(pieces: list[str]) -> list[int]:
    return [t for ids in get_tokenizer().encode_ordinary_batch(pieces) for t in ids]


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(texts, runs), size=st.integers(1, 64))
def test_pieces_tokenize_exactly_as_the_whole_text(text, size):
    report = ReadReport()
    pieces, _ = cut_pieces(text, report, size=size, search=1 << 20)  # cut as often as possible, never forced
    assert "".join(pieces) == text and all(pieces)
    assert tokens_of_pieces(pieces) == get_tokenizer().encode_ordinary(text)
    assert report.forced_cuts == 0


SEARCH = 16


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(texts, runs), size=st.integers(1, 64))
def test_pieces_stay_short_and_are_exact_unless_a_cut_was_forced(text, size):
    report = ReadReport()
    pieces, _ = cut_pieces(text, report, size=size, search=SEARCH)
    assert "".join(pieces) == text
    assert max(map(len, pieces), default=0) <= size + SEARCH + 1  # bounded, whatever the text
    if report.forced_cuts == 0:
        assert tokens_of_pieces(pieces) == get_tokenizer().encode_ordinary(text)


@settings(max_examples=examples(300), deadline=None)
@given(text=st.one_of(texts, runs), size=st.integers(1, 64), block=st.integers(1, 40))
def test_files_read_in_blocks_tokenize_exactly_as_the_whole_file(tmp_path_factory, text, size, block):
    path = tmp_path_factory.mktemp("blocks") / "a.txt"
    path.write_bytes(text.encode())
    report = ReadReport()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(corpus, "READ_BYTES", block)  # blocks end inside multi-byte characters
        patch.setattr(corpus, "SEGMENT_CHARS", size)
        patch.setattr(corpus, "CUT_SEARCH_CHARS", SEARCH)
        pieces = list(text_file_pieces([path], report))
    text = text.removeprefix("\ufeff")  # a byte-order mark is not text
    assert "".join(p for p, _ in pieces) == text
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True] * bool(pieces)
    assert max((len(p) for p, _ in pieces), default=0) <= size + SEARCH + 1
    if report.forced_cuts == 0:
        assert tokens_of_pieces([p for p, _ in pieces]) == get_tokenizer().encode_ordinary(text)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents=st.lists(st.one_of(texts, runs), min_size=1, max_size=4), size=st.integers(1, 64),
       workers=st.integers(1, 3), in_flight=st.integers(1, 200))  # fmt: skip
def test_the_token_file_holds_each_whole_documents_tokens_then_endoftext(
    tmp_path_factory, documents, size, workers, in_flight
):
    folder = tmp_path_factory.mktemp("tokens")
    files = []
    for i, text in enumerate(documents):
        files.append(folder / f"{i}.txt")
        files[-1].write_bytes(text.encode())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(corpus, "SEGMENT_CHARS", size)  # many pieces in flight, finishing out of order
        patch.setattr(corpus, "CUT_SEARCH_CHARS", 1 << 20)
        patch.setattr(token_cache, "BATCH_CHARS", in_flight)
        stats = token_cache.tokenize_to_file(text_file_pieces(files, ReadReport()), folder / "t.bin", workers, None)
    documents = [text.removeprefix("\ufeff") for text in documents]  # a byte-order mark is not text
    expected = [t for text in documents if text for t in get_tokenizer().encode_ordinary(text) + [EOT_ID]]
    assert np.fromfile(folder / "t.bin", dtype=np.uint16).tolist() == expected
    assert stats["tokens"] == len(expected) and stats["documents"] == sum(map(bool, documents))
    assert stats["bytes"] == sum(len(text.encode()) for text in documents)
    assert stats["words"] == sum(len(re.findall(r"[^\t\n\x0b\x0c\r\x1c-\x1f ]+", text)) for text in documents)


@pytest.mark.parametrize(
    "shape",
    [
        lambda t: t,
        lambda t: t.replace("\n", "\r\n"),  # CRLF
        lambda t: t.replace("\n", " "),  # no newline at all
        lambda t: re.sub(r"\n", "\n\n\n   \n", t),  # runs of blank lines and spaces
    ],
    ids=["as-is", "crlf", "no-newlines", "blank-runs"],
)
@pytest.mark.parametrize("name", ["wikitext-2/test.txt", "wikitext-2/valid.txt", "tinyshakespeare.txt"])
def test_real_files_cut_into_many_pieces_tokenize_exactly(name, shape):
    if not (SHARED / name).exists():
        pytest.skip(f"{SHARED / name} is not here")
    text = shape((SHARED / name).read_text())
    report = ReadReport()
    pieces, _ = cut_pieces(text, report, size=997, search=200)
    assert len(pieces) > 1000 and report.forced_cuts == 0
    assert tokens_of_pieces(pieces) == get_tokenizer().encode_ordinary(text)


def test_text_without_any_boundary_is_cut_anyway_and_counted():
    text = "a" * 5000 + " tail"
    report = ReadReport()
    pieces, _ = cut_pieces(text, report, size=1000, search=100)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 1100
    assert report.forced_cuts == 4  # at 1000, 2000, 3000, 4000; the rest ends at the space


def cfg(tmp_path, data, **kw) -> DataConfig:
    return DataConfig(data=str(data), cache_dir=str(tmp_path / "cache"), workers=2, **kw)


def test_forced_cuts_go_in_the_manifest_with_one_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(corpus, "SEGMENT_CHARS", 1000)
    monkeypatch.setattr(corpus, "CUT_SEARCH_CHARS", 100)
    (tmp_path / "letters.txt").write_text("x" * 20_000 + " end\n" + "words and more words\n" * 200)
    manifest = check_cache(prepare(cfg(tmp_path, tmp_path / "letters.txt"), min_tokens=17, verbose=True))
    assert manifest["forced_cuts"] == 19
    warnings = [line for line in capsys.readouterr().err.splitlines() if "cut anyway" in line]
    assert len(warnings) == 1 and "19" in warnings[0]


# --- WikiText exactly as published -----------------------------------------------------------------

FIXTURE = (
    " \n = Alpha = \n \n Alpha is a letter , written with @-@ signs .\n \n = = Use = = \n \n"
    " In formulas :\n = 1 + 2 = \n It is said 'so' .\n = x + y = \n \n"
    " = Beta = \n \n Beta follows .\n \n \n = = = Deep = = = \n \n End of <unk> .\n \n"
)


def published_documents(raw: str) -> list[str]:
    """The raw text cut before every title line that follows a blank line (WikiText's articles),
    written independently of the loader's code: a regex over the whole text."""
    starts = [m.start() for m in re.finditer(r"(?m)(?<=^ \n) = [^=].* = \n", raw)]
    cuts = [0] + [s for s in starts if raw[:s].strip()] + [len(raw)]
    return [raw[a:b] for a, b in zip(cuts, cuts[1:])]


def write_hub_style_dataset(folder: Path, raw: str) -> None:
    """Parquet files whose rows follow the hub loader's rule: one row per line of the raw file, a
    blank line as an empty row."""
    datasets = pytest.importorskip("datasets")
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    folder.mkdir()
    for split in ("train", "validation", "test"):
        datasets.Dataset.from_dict({"text": rows}).to_parquet(folder / f"{split}.parquet")


@pytest.mark.parametrize("source", ["fixture", "wikitext-2-test"])
def test_wikitext_cache_holds_the_published_text_through_load_dataset(tmp_path, source):
    if source == "fixture":
        raw = FIXTURE * 3
    elif WIKITEXT_TEST.exists():
        raw = WIKITEXT_TEST.read_text()
    else:
        pytest.skip(f"{WIKITEXT_TEST} is not here")
    write_hub_style_dataset(tmp_path / "wikitext-local", raw)
    folder = prepare(cfg(tmp_path, tmp_path / "wikitext-local"), min_tokens=17)
    documents = published_documents(raw)
    expected = [t for doc in get_tokenizer().encode_ordinary_batch(documents) for t in doc + [EOT_ID]]
    test = open_split(folder, "test")
    assert test.tolist() == expected
    assert check_cache(folder)["splits"]["test"]["documents"] == len(documents)
    if source == "fixture":
        assert len(documents) == 6  # the formula lines after text are not titles
    else:
        assert len(expected) - len(documents) == len(get_tokenizer().encode_ordinary(raw)) == 295_877
        assert len(documents) == 60


# --- the bundled corpus ----------------------------------------------------------------------------


def test_bundled_shakespeare_is_the_text_and_works_offline(tmp_path):
    source = corpus.resolve_source(cfg(tmp_path, "shakespeare"))
    raw = gzip.decompress(source.files[0].read_bytes()).decode()
    assert raw.startswith("First Citizen:\nBefore we proceed any further") and len(raw) > 1_000_000
    folder = prepare(cfg(tmp_path, "shakespeare", val_fraction=0.1), min_tokens=129)
    train, val = open_split(folder, "train"), open_split(folder, "val")
    tokens = np.asarray(get_tokenizer().encode_ordinary(raw) + [EOT_ID], dtype=np.uint16)
    assert len(train) + len(val) == len(tokens)
    start = int(np.argmax(train != tokens[: len(train)]))  # where the held-out span was taken out
    assert np.array_equal(tokens[start : start + len(val)], val)
    assert np.array_equal(np.concatenate([tokens[:start], tokens[start + len(val) :]]), train)


@pytest.mark.parametrize("run", [" ", "\n", "\t"])
def test_a_megabyte_of_whitespace_before_text_is_cut_into_pieces_the_tokenizer_can_take(tmp_path, run):
    # tiktoken alone panics on this text (a whitespace run of a million characters, then a letter)
    path = tmp_path / "blank.txt"
    path.write_text(run * 1_020_000 + "x")
    report = ReadReport()
    pieces = [piece for piece, _ in text_file_pieces([path], report)]
    assert "".join(pieces) == path.read_text()
    assert len(tokens_of_pieces(pieces)) > 0  # raises (PanicException) on pieces too long for tiktoken


def safetensors_like() -> bytes:
    """What a safetensors file holds: an 8-byte header length, a JSON header, then raw float32 weights."""
    weights = np.random.default_rng(0).normal(0, 0.02, 64 * 64).astype(np.float32).tobytes()
    entry = {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, len(weights)]}
    header = json.dumps({"__metadata__": {"format": "pt"}, "wte.weight": entry}).encode()
    return struct.pack("<Q", len(header)) + header + weights


BINARIES = {
    "notes.txt": lambda: gzip.compress(make_text(20000, 4).encode()),  # gzip output without a .gz name
    "random.txt": lambda: random.Random(0).randbytes(1 << 16),
    "model.safetensors": safetensors_like,
}


@pytest.mark.parametrize("name", BINARIES)
def test_binary_files_are_refused_in_one_line(cli, tmp_path, name):
    (tmp_path / name).write_bytes(BINARIES[name]())
    proc = cli("prepare", "--data", str(tmp_path / name), "--max-seq-len", "32", "--cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(proc, str(tmp_path / name), "not UTF-8 text", "binary file")
    assert not any((tmp_path / "cache").glob("*"))


def test_messy_text_passes_with_its_undecodable_bytes_counted(cli, tmp_path):
    """Latin-1 accents, a terminal escape, a form feed and a bell: text, though not clean UTF-8."""
    text = make_text(3000, 6).encode().replace(b" the ", b" th\xe9 ").replace(b" of ", b" \x1b[1mof\x1b[0m \x0c\x07")
    (tmp_path / "messy.txt").write_bytes(text)
    proc = cli("prepare", "--data", str(tmp_path / "messy.txt"), "--max-seq-len", "32",
               "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {text.count(0xE9):,} bytes of {tmp_path / 'messy.txt'} were not valid UTF-8" in proc.stderr
