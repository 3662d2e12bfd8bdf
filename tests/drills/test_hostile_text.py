"""Drills: `prepare` on text shaped against the cutter, through the real command."""

import math
import random

import numpy as np
import pytest

from examplegpt.data.corpus import SEGMENT_CHARS
from examplegpt.tokenizer import EOT_ID, get_tokenizer

from ..conftest import assert_one_line_error

pytestmark = pytest.mark.slow  # megabytes of text through the tokenizer

WHITESPACE = [" ", "\n", "\t", "\r\n", " \n ", "\u3000", "\xa0"]


def prepare_cli(cli, path, cache):
    return cli("prepare", "--data", str(path), "--cache-dir", str(cache), "--max-seq-len", "64")


def cached_tokens(cache) -> tuple[np.ndarray, np.ndarray, dict]:
    import json

    (folder,) = [p for p in cache.iterdir() if (p / "manifest.json").exists()]
    manifest = json.loads((folder / "manifest.json").read_text())
    train, val = (np.fromfile(folder / f"{s}.bin", dtype=np.uint16) for s in ("train", "val"))
    return train, val, manifest


def test_mostly_whitespace_is_cut_exactly_without_a_warning(tmp_path, cli):
    rng = random.Random(0)
    parts = []
    while sum(map(len, parts)) < 3_000_000:  # runs of up to 40,000 whitespace characters between rare words
        parts.append(rng.choice(WHITESPACE) * rng.randint(1, 40_000 // 2) + rng.choice(["word", "x", "'s", "1"]))
    text = "".join(parts)
    (tmp_path / "blank.txt").write_text(text)
    proc = prepare_cli(cli, tmp_path / "blank.txt", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    train, val, manifest = cached_tokens(tmp_path / "cache")
    assert manifest["forced_cuts"] == 0
    tokens = np.asarray(get_tokenizer().encode_ordinary(text) + [EOT_ID], dtype=np.uint16)
    start = int(np.argmax(train != tokens[: len(train)]))  # where the held-out span was taken out
    assert np.array_equal(np.concatenate([train[:start], val, train[start:]]), tokens)


def test_megabytes_of_letters_without_a_space_are_cut_anyway_with_one_warning(tmp_path, cli):
    rng = random.Random(1)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzé") for _ in range(3_500_000))
    (tmp_path / "letters.txt").write_text(text)
    proc = prepare_cli(cli, tmp_path / "letters.txt", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "cut anyway" in warnings[0], proc.stderr
    train, val, manifest = cached_tokens(tmp_path / "cache")
    assert (
        manifest["forced_cuts"] == math.ceil(len(text) / SEGMENT_CHARS) - 1
    )  # a piece per SEGMENT_CHARS, no boundary anywhere
    assert len(train) + len(val) > len(text) // 4  # the whole text is there, as tokens

    # the same letters with no room for a validation block: one line, and no cache left behind
    (tmp_path / "short.txt").write_text(text[:100])
    proc = prepare_cli(cli, tmp_path / "short.txt", tmp_path / "cache2")
    assert_one_line_error(proc, "too short")
    assert not any((tmp_path / "cache2").glob("*"))
