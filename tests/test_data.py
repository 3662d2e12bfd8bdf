"""The data pipeline: every source kind, the verified cache, and the resumable, shardable loader."""

import gzip
import json
import os
import shutil

import numpy as np
import pytest

from examplegpt.config import DataConfig
from examplegpt.data import TokenWindows, check_cache, open_split, prepare
from examplegpt.data.corpus import ReadReport, cut_pieces
from examplegpt.errors import UserError
from examplegpt.tokenizer import EOT_ID, decode, encode

from .conftest import assert_one_line_error, make_text


def cfg(tmp_path, data, **kw) -> DataConfig:
    return DataConfig(data=str(data), cache_dir=str(tmp_path / "cache"), workers=2, **kw)


def test_local_file_round_trips_through_the_cache(tmp_path):
    text = make_text(4000, 0)
    (tmp_path / "a.txt").write_text(text)
    folder = prepare(cfg(tmp_path, tmp_path / "a.txt"), min_tokens=65)
    manifest = check_cache(folder)
    train, val = open_split(folder, "train"), open_split(folder, "val")
    assert manifest["validation_held_out"] and manifest["splits"]["train"]["documents"] == 1
    assert len(train) + len(val) == len(encode(text)) + 1  # + the <|endoftext|> that ends the document
    assert len(val) >= 65
    assert train.dtype == np.uint16


def test_folder_and_glob_make_one_document_per_file(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(make_text(2000, i))
    (docs / "notes.bin").write_bytes(b"\x00\x01")  # not text: ignored in a folder
    for source in (docs, str(docs / "*.txt")):
        folder = prepare(cfg(tmp_path, source), min_tokens=33)
        manifest = check_cache(folder)
        assert manifest["splits"]["train"]["documents"] == 3
        all_tokens = np.concatenate([open_split(folder, "train"), open_split(folder, "val")])
        assert (all_tokens == EOT_ID).sum() == 3


def test_a_folder_reads_its_gzip_compressed_text_files_too(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = [make_text(2000, i) for i in range(3)]
    (docs / "0.txt").write_text(texts[0])
    (docs / "1.txt.gz").write_bytes(gzip.compress(texts[1].encode()))
    (docs / "2.md.gz").write_bytes(gzip.compress(texts[2].encode()))
    (docs / "archive.tar.gz").write_bytes(gzip.compress(b"\x00" * 100))  # not a text file: ignored
    folder = prepare(cfg(tmp_path, docs), min_tokens=33)
    tokens = np.concatenate([open_split(folder, "train"), open_split(folder, "val")])
    assert len(tokens) == sum(len(encode(text)) + 1 for text in texts)


def test_a_utf8_byte_order_mark_is_not_text(tmp_path):
    text = make_text(2000, 4)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    folder = prepare(cfg(tmp_path, tmp_path / "bom.txt"), min_tokens=33)
    tokens = np.concatenate([open_split(folder, "train"), open_split(folder, "val")])
    assert len(tokens) == len(encode(text)) + 1 and check_cache(folder)["invalid_utf8_bytes"] == 0


def test_a_file_whose_name_holds_glob_characters_is_that_file(tmp_path):
    text = make_text(2000, 5)
    path = tmp_path / "notes [draft] v1?.txt"
    path.write_text(text)
    folder = prepare(cfg(tmp_path, path), min_tokens=33)
    all_tokens = np.concatenate([open_split(folder, "train"), open_split(folder, "val")])
    assert len(all_tokens) == len(encode(text)) + 1


def test_local_huggingface_dataset_folder_uses_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = ["", " = Alpha = \n", "", " Alpha text .\n", "", " = = Section = = \n", "", " more .\n",
            "", " = Beta = \n", "", " Beta text .\n", " = 1 + 2 = \n", ""]  # fmt: skip
    split = datasets.Dataset.from_dict({"text": rows * 20})
    datasets.DatasetDict({"train": split, "validation": split, "test": split}).save_to_disk(tmp_path / "wikitext")
    folder = prepare(cfg(tmp_path, tmp_path / "wikitext"), min_tokens=17)
    manifest = check_cache(folder)
    assert set(manifest["splits"]) == {"train", "val", "test"} and not manifest["validation_held_out"]
    assert manifest["splits"]["train"]["documents"] == 40  # one per title after a blank line, not per row
    train = open_split(folder, "train")
    first_doc = decode(train[: list(train).index(EOT_ID)].tolist())
    assert first_doc == "".join(row or " \n" for row in rows[:9])  # blank rows are the file's " \n" lines

    # parquet files in the hub's layout go through datasets.load_dataset on the folder
    (tmp_path / "pq").mkdir()
    split.to_parquet(tmp_path / "pq" / "train.parquet")
    split.to_parquet(tmp_path / "pq" / "validation.parquet")
    manifest = check_cache(prepare(cfg(tmp_path, tmp_path / "pq"), min_tokens=17))
    assert manifest["splits"]["train"]["documents"] == 140  # not WikiText: one document per non-empty row


def test_second_run_reuses_the_cache(tmp_path):
    (tmp_path / "a.txt").write_text(make_text(3000, 1))
    config = cfg(tmp_path, tmp_path / "a.txt")
    folder = prepare(config, min_tokens=33)
    stamp = (folder / "train.bin").stat().st_mtime_ns
    assert prepare(config, min_tokens=33) == folder
    assert (folder / "train.bin").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "no_manifest", "edit_manifest"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, damage):
    (tmp_path / "a.txt").write_text(make_text(3000, 2))
    config = cfg(tmp_path, tmp_path / "a.txt")
    folder = prepare(config, min_tokens=33)
    good = bytes(open_split(folder, "train"))
    if damage == "truncate":
        os.truncate(folder / "train.bin", len(good) - 2)
    elif damage == "bitflip":
        raw = bytearray(good)
        raw[len(raw) // 2] ^= 0x04
        (folder / "train.bin").write_bytes(bytes(raw))
    elif damage == "no_manifest":  # what a kill between writing the tokens and the manifest would leave
        (folder / "manifest.json").unlink()
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["splits"]["train"]["tokens"] -= 1
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError):
        check_cache(folder)
    assert prepare(config, min_tokens=33) == folder
    assert bytes(open_split(folder, "train")) == good


def test_split_document_tokenizes_exactly_like_the_whole():
    text = "".join(make_text(600, seed) + ("\n\n  indented\n" if seed % 2 else "x\ny\n") for seed in range(20))
    pieces, _ = cut_pieces(text, ReadReport(), size=500)
    assert len(pieces) > 5 and "".join(pieces) == text
    assert sum((encode(p) for p in pieces), []) == encode(text)


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(make_text(2000, 3).encode() + b"\xff\xfe\xc3 tail\n")
    manifest = check_cache(prepare(cfg(tmp_path, tmp_path / "bad.txt"), min_tokens=33))
    assert manifest["invalid_utf8_bytes"] == 3


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda p: None, ["no such file"]),
        (lambda p: (p / "empty.txt").write_text(""), ["no text"]),
        (lambda p: (p / "short.txt").write_text("too short"), ["too short"]),
        (lambda p: (p / "emptydir").mkdir(), ["no .txt, .text or .md files"]),
        (lambda p: (p / "in").mkdir() or (p / "in" / "d.txt").write_text("x"), ["no such file", "d.bin"]),
        (lambda p: (p / "u16.txt").write_text(make_text(500, 1), encoding="utf-16"), ["UTF-16", "convert"]),
        (lambda p: (p / "u16.txt").write_text(make_text(500, 1), encoding="utf-16-le"), ["not UTF-8", "control"]),
        (lambda p: (p / "u16.txt").write_text("short text " * 30, encoding="utf-16-le"), ["not UTF-8"]),
        (lambda p: (p / "u32.txt").write_text("short text " * 30, encoding="utf-32-be"), ["not UTF-8"]),
        (lambda p: (p / "ru.txt").write_text("Привет мир " * 300, encoding="utf-16-le"), ["not UTF-8"]),
        (lambda p: (p / "c.txt.gz").write_bytes(corrupt_gzip(make_text(5000, 2))), ["cannot read", "c.txt.gz"]),
        (lambda p: (p / "fake.txt.gz").write_text(make_text(500, 2)), ["cannot read", "fake.txt.gz"]),
    ],
    ids=[
        "missing",
        "empty",
        "shorter-than-a-block",
        "folder-without-text",
        "missing-in-a-folder",
        "utf-16",
        "utf-16-without-mark",
        "utf-16-short",
        "utf-32-short",
        "utf-16-cyrillic",
        "corrupt-gzip",
        "not-gzip",
    ],  # fmt: skip
)
def test_bad_sources_fail_in_one_line(cli, monkeypatch, tmp_path, setup, words):
    setup(tmp_path)
    target = next(tmp_path.iterdir(), tmp_path / "nope.txt")
    if target.name == "in":
        target = "in/d.bin"  # relative: a hub id has the same shape, but in/ is a folder here
    monkeypatch.chdir(tmp_path)
    proc = cli("prepare", "--data", str(target), "--cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(proc, *words)
    assert not any((tmp_path / "cache").glob("*"))  # nothing half-written left behind


def corrupt_gzip(text: str) -> bytes:
    data = bytearray(gzip.compress(text.encode()))
    data[200:300] = bytes(b ^ 0xFF for b in data[200:300])  # inside the deflate stream
    return bytes(data)


@pytest.mark.parametrize("name", ["nosuchdir/", "notes.TXT", "Notes.Md", "corpus.zip", "notes.txt.bz2", "in/d.bin"])
def test_a_missing_path_is_named_as_one_not_taken_for_a_hub_id(cli, monkeypatch, tmp_path, name):
    (tmp_path / "in").mkdir()
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli("prepare", "--data", name, "--cache-dir", str(tmp_path / "cache")), "no such file", name)


def test_a_name_that_could_be_a_hub_id_says_both_when_offline(cli, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    proc = cli("prepare", "--data", "notes", "--cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(proc, "no file or folder notes here", "cannot reach the Hugging Face hub")
    assert_one_line_error(cli("prepare", "--data", "", "--cache-dir", str(tmp_path / "cache")), "--data is empty")


def test_a_folder_skips_hidden_files_and_reads_any_letter_case(tmp_path):
    docs = tmp_path / "docs"
    (docs / ".ipynb_checkpoints").mkdir(parents=True)
    (docs / "NOTES.TXT").write_text(make_text(2000, 1))
    (docs / ".hidden.txt").write_text(make_text(2000, 2))
    (docs / ".ipynb_checkpoints" / "copy.txt").write_text(make_text(2000, 3))
    folder = prepare(cfg(tmp_path, docs), min_tokens=33)
    tokens = np.concatenate([open_split(folder, "train"), open_split(folder, "val")])
    assert len(tokens) == len(encode(make_text(2000, 1))) + 1


def test_a_stale_temporary_folder_of_any_name_does_not_stop_a_build(tmp_path):
    (tmp_path / "a.txt").write_text(make_text(2000, 6))
    folder = prepare(cfg(tmp_path, tmp_path / "a.txt"), min_tokens=33)
    shutil.rmtree(folder)
    (folder.parent / f"{folder.name}.tmp-old").mkdir()  # not a process id
    assert check_cache(prepare(cfg(tmp_path, tmp_path / "a.txt"), min_tokens=33))
    assert not (folder.parent / f"{folder.name}.tmp-old").exists()


def test_missing_text_column_is_reported(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["x"] * 5})}).save_to_disk(tmp_path / "ds")
    with pytest.raises(UserError, match="no text column 'text'"):
        prepare(cfg(tmp_path, tmp_path / "ds"), min_tokens=9)


def test_hub_source_offline_fails_fast_and_leaves_nothing(cli, tmp_path):
    proc = cli("prepare", "--data", "wikitext-2", "--cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(proc, "cannot reach the Hugging Face hub", "--data")
    assert not any((tmp_path / "cache").glob("*"))


def windows_loader(rank=0, world_size=1, seed=7):
    tokens = np.arange(1, 5 * 64 + 2, dtype=np.uint16)  # 64 windows of 5 tokens
    return TokenWindows(tokens, seq_len=5, batch_size=8, seed=seed, rank=rank, world_size=world_size)


def test_an_epoch_sees_every_window_once_and_targets_are_shifted_inputs():
    loader = windows_loader()
    seen = []
    for index in range(loader.batches_per_epoch):
        x, y = loader.batch(0, index)
        assert x.shape == (8, 5) and np.array_equal(x[:, 1:], y[:, :-1])
        seen.extend((x[:, 0] - 1) // 5)
    assert sorted(seen) == list(range(64))
    assert not np.array_equal(loader.batch(0, 0)[0], loader.batch(1, 0)[0])  # reshuffled each epoch


def test_loader_position_resumes_exactly():
    straight = [windows_loader().batch(e, i)[0] for e in range(2) for i in range(8)]
    resumed_loader = windows_loader()  # a new process that only knows (epoch=1, index=3)
    resumed = [resumed_loader.batch(1, i)[0] for i in range(3, 8)]
    for a, b in zip(straight[8 + 3 :], resumed):
        assert np.array_equal(a, b)


def test_ranks_shard_the_global_batch_without_overlap():
    whole = windows_loader()
    for index in range(whole.batches_per_epoch):
        parts = [windows_loader(rank=r, world_size=4).batch(0, index)[0] for r in range(4)]
        assert np.array_equal(np.concatenate(parts), whole.batch(0, index)[0])


def test_batch_larger_than_the_corpus_is_a_clear_error():
    with pytest.raises(UserError, match="lower --batch-size"):
        TokenWindows(np.zeros(20, dtype=np.uint16), seq_len=5, batch_size=8, seed=0)


def test_text_files_are_read_in_blocks_without_changing_tokens(tmp_path, monkeypatch):
    from examplegpt.data import corpus

    text = "".join(make_text(300, seed) + "naïve 東京 🚀\n" for seed in range(10))
    (tmp_path / "a.txt").write_text(text)
    monkeypatch.setattr(corpus, "READ_BYTES", 61)  # blocks cut through multi-byte characters
    monkeypatch.setattr(corpus, "SEGMENT_CHARS", 200)
    report = corpus.ReadReport()
    pieces = list(corpus.text_file_pieces([tmp_path / "a.txt"], report))
    assert len(pieces) > 10 and [end for _, end in pieces].count(True) == 1 and pieces[-1][1]
    assert "".join(p for p, _ in pieces) == text and report.invalid_utf8_bytes == 0
    assert sum((encode(p) for p, _ in pieces), []) == encode(text)


@pytest.mark.parametrize("text", ["", " ", "one", " two  words\n", "a\tb\nc  d \x0be\x1ff ", "naïve 東京 🚀 x"])
def test_word_count_matches_str_split(text):
    from examplegpt.data.token_cache import count_words

    assert count_words(text.encode()) == len(text.split())
