"""The shipped GPT-2 BPE is tiktoken's r50k_base, and it works with no network."""

import hashlib
import shutil

import pytest
import tiktoken

from examplegpt import tokenizer
from examplegpt.tokenizer import EOT, EOT_ID, RANKS_FILE, decode, encode, get_tokenizer

TEXTS = [
    "Hello, world! The history of the Roman Empire spans 1,000 years.",
    "  leading spaces,\ttabs\t\tand    runs of   whitespace\n\n\nand newlines  ",
    "naïve café — “quotes” 東京 🚀🚀 emoji ñ ß Ω",
    "Numbers: 3.14159, 1e-5, 0x1F, 2026-11-25, 1234567890",
    "it's they're we'll I'd you've SHE'S",
    f"one document{EOT}another document",
    " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : <unk> Chronicles",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """tiktoken's own r50k_base, fed our file through its download cache (the URL's sha1 is the cache key)."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    shutil.copy(RANKS_FILE, cache / hashlib.sha1(url.encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    encoding = tiktoken.get_encoding("r50k_base")
    mp.undo()
    return encoding


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken_r50k_base(reference, text):
    ours = encode(text)
    assert ours == reference.encode(text, allowed_special="all")
    assert decode(ours) == text


def test_endoftext_is_the_special_token():
    assert encode(EOT) == [EOT_ID]
    assert encode(EOT, allow_eot=False) != [EOT_ID]  # as plain text it is ordinary tokens
    assert get_tokenizer().n_vocab == 50257


def test_tampered_ranks_file_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(RANKS_FILE.read_bytes().replace(b" 0\n", b" 1\n", 1))
    monkeypatch.setattr(tokenizer, "RANKS_FILE", bad)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cached copy can hide the change
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match="[Hh]ash"):
            tokenizer.get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()
