"""Evaluation: the sliding-window protocol against brute force, the command, export to Hugging Face."""

import copy
import gzip
import json
import math
import re

import numpy as np
import pytest
import torch

from examplegpt import GPT
from examplegpt.device import prepare_for_inference
from examplegpt.evaluate import exp_or_inf, sliding_window_nll, window_plan
from examplegpt.tokenizer import encode
from examplegpt.weights import save_model_file

from .conftest import REPO, assert_one_line_error, fresh_process, make_text, tiny_config


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return GPT(tiny_config(max_seq_len=16)).eval()


@pytest.mark.parametrize("n, window, stride", [(100, 16, 8), (100, 16, 5), (17, 16, 16), (50, 16, 1), (3, 16, 8)])
def test_every_target_is_scored_exactly_once(n, window, stride):
    scored = []
    for start, end, first in window_plan(n, window, stride):
        assert end - start <= window and first > start
        scored.extend(range(first, end + 1))
    assert scored == list(range(1, n))


@pytest.mark.parametrize("stride", [16, 8, 3])
def test_sliding_window_equals_brute_force_per_token(small_model, stride):
    tokens = np.random.default_rng(0).integers(0, 50257, 70).astype(np.uint16)
    total, count = sliding_window_nll(small_model, tokens, stride, batch_size=3, device=torch.device("cpu"))
    brute = 0.0
    with torch.no_grad():
        for start, end, first in window_plan(len(tokens), 16, stride):
            for target in range(first, end + 1):  # each token alone, on the context the protocol gives it
                context = torch.from_numpy(tokens[start:target].astype(np.int64))[None]
                logits, _ = small_model(context)
                brute -= torch.log_softmax(logits[0, -1], -1)[int(tokens[target])].item()
    assert count == 69
    assert total == pytest.approx(brute, rel=1e-5)


def test_stride_equal_to_the_window_is_the_plain_chunked_loss(small_model):
    tokens = np.random.default_rng(1).integers(0, 50257, 16 * 5 + 1).astype(np.uint16)
    total, count = sliding_window_nll(small_model, tokens, 16, batch_size=2, device=torch.device("cpu"))
    t = torch.from_numpy(tokens.astype(np.int64))
    x, y = t[:-1].view(5, 16), t[1:].view(5, 16)
    with torch.no_grad():
        _, loss = small_model(x, y)
    assert count == 80 and total / count == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_evaluation_allocates_one_logits_buffer_not_one_per_batch(small_model, precision):
    """A fresh (rows, vocabulary) float32 tensor per batch page-faults its way through memory (the system
    time of evaluating with a small model); the bytes allocated must not grow with the number of batches.
    An int8 head converts its matrix back to float once for the run (two (V, C) float32 tensors)."""
    from torch.profiler import ProfilerActivity, profile

    model = prepare_for_inference(copy.deepcopy(small_model), precision, torch.device("cpu"))
    one_buffer = 8 * 16 * model.config.padded_vocab_size * 4  # batch 8 x window 16 rows, float32
    head_matrix = model.config.padded_vocab_size * model.config.d_model * 4 if precision == "int8" else 0
    tokens = np.random.default_rng(2).integers(0, 50257, 16 * 8 * 6 + 1).astype(np.uint16)  # six batches
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sliding_window_nll(model, tokens, 16, batch_size=8, device=torch.device("cpu"))
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    assert allocated < 2 * one_buffer + 2 * head_matrix  # a buffer per batch would be six


@pytest.fixture
def model_file(tmp_path, small_model):
    path = tmp_path / "gpt_model.pt"
    save_model_file(small_model, path)
    return path


def test_evaluate_command_on_a_text_file(cli, tmp_path, model_file):
    text = make_text(600, 9)
    (tmp_path / "eval.txt").write_text(text)
    proc = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "eval.txt"), "--json", "--stride", "8")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["tokens_scored"] == len(encode(text))  # every token of the text, none of the <|endoftext|>
    assert result["words"] == len(text.split())
    assert result["word_perplexity"] == pytest.approx(
        np.exp(result["loss"] * result["tokens_scored"] / result["words"])
    )
    table = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "eval.txt"))
    assert "word_perplexity" in table.stdout and "bits_per_byte" in table.stdout


def test_evaluate_reports_the_precision_it_ran_in_and_the_guide_names_every_field(cli, tmp_path, model_file):
    (tmp_path / "eval.txt").write_text(make_text(600, 9))
    proc = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "eval.txt"), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["precision"] == "fp32"  # --precision auto, as it resolved on CPU
    guide = (REPO / "docs" / "evaluate.md").read_text()
    assert [key for key in result if f"`{key}`" not in guide] == []


def test_evaluate_verbose_says_so_when_no_weight_was_packed(cli, tmp_path, model_file, monkeypatch):
    from examplegpt import cpu_inference

    fresh_process(monkeypatch)
    (tmp_path / "eval.txt").write_text(make_text(600, 9))
    proc = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "eval.txt"), "--device", "cpu",
               "--precision", "int8", "--verbose")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"cpu_inference: {cpu_inference.NONE_TRIED}: {cpu_inference.NONE_TRIED_BECAUSE}" in proc.stderr
    assert re.search(r"precision\s+int8\n", proc.stdout)


def test_evaluate_on_a_file_says_it_scored_the_whole_text_and_shows_progress(cli, tmp_path, model_file, monkeypatch):
    import examplegpt.evaluate

    monkeypatch.setattr(examplegpt.evaluate, "PROGRESS_AFTER_SECONDS", 0)  # every evaluation is "long"
    (tmp_path / "eval.txt").write_text(make_text(600, 9))
    table = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "eval.txt"))
    assert table.returncode == 0, table.stderr
    assert re.search(r"split\s+whole text\n", table.stdout)
    assert "evaluating" in table.stderr  # tqdm's bar on stderr, although stderr is not a terminal here
    proc = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "eval.txt"), "--json")
    assert json.loads(proc.stdout.splitlines()[-1])["split"] == "whole text"


def test_evaluate_counts_the_files_bytes_and_warns_of_undecodable_ones(cli, tmp_path, model_file):
    text = make_text(600, 3)
    raw = text.encode().replace(b" the ", b" th\xe9 ")  # Latin-1 bytes: not UTF-8
    (tmp_path / "latin1.txt").write_bytes(raw)
    proc = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "latin1.txt"), "--json", "--stride", "8")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    invalid = raw.count(0xE9)
    assert "not valid UTF-8" in proc.stderr and f"{invalid:,} bytes" in proc.stderr
    total_bits = result["loss"] * result["tokens_scored"] / np.log(2)
    assert total_bits / result["bits_per_byte"] == pytest.approx(len(raw))  # the file's bytes, not U+FFFD's


def strict_json(line: str) -> dict:
    """json.loads, refusing the NaN and Infinity that Python's json writes and reads by default."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_a_word_perplexity_past_floats_range_is_infinite_not_a_crash(cli, tmp_path, model_file):
    (tmp_path / "long.txt").write_text("abc123" * 300)  # one word of hundreds of tokens
    table = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "long.txt"), "--stride", "8")
    assert table.returncode == 0, table.stderr
    assert re.search(r"word_perplexity\s+inf", table.stdout)
    proc = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "long.txt"), "--stride", "8", "--json")
    result = strict_json(proc.stdout.splitlines()[-1])  # no Infinity
    assert result["words"] == 1 and result["word_perplexity"] is None and result["loss"] > 0
    assert exp_or_inf(709.5) == math.exp(709.5) < math.inf  # finite up to float64's edge


def test_a_diverged_models_nan_loss_is_null_in_json(cli, tmp_path, small_model):
    huge = copy.deepcopy(small_model)
    with torch.no_grad():
        for weight in huge.parameters():
            weight.mul_(1e30)  # activations overflow float32: the loss is NaN
    save_model_file(huge, tmp_path / "huge.pt")
    (tmp_path / "eval.txt").write_text(make_text(200, 9))
    args = ["evaluate", "-c", str(tmp_path / "huge.pt"), "--data", str(tmp_path / "eval.txt")]
    table = cli(*args)
    assert table.returncode == 0, table.stderr
    assert re.search(r"loss\s+nan\n", table.stdout)
    result = strict_json(cli(*args, "--json").stdout.splitlines()[-1])
    assert result["loss"] is None and result["perplexity"] is None and result["bits_per_byte"] is None
    assert result["tokens_scored"] > 0


def test_evaluate_refuses_a_binary_file_in_one_line(cli, tmp_path, model_file):
    (tmp_path / "eval.txt").write_bytes(gzip.compress(make_text(2000, 9).encode()))  # gzip named .txt
    proc = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "eval.txt"))
    assert_one_line_error(proc, "eval.txt is not UTF-8 text", "binary file")


def test_evaluate_bad_input(cli, tmp_path, model_file, small_model):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "eval.txt").write_text(make_text(600, 9))
    text = str(tmp_path / "eval.txt")
    assert_one_line_error(cli("evaluate", "-c", str(model_file), "--data", text, "--stride", "0"), "stride")
    assert_one_line_error(cli("evaluate", "-c", str(model_file), "--data", text, "--stride", "17"), "stride")
    split = datasets.Dataset.from_dict({"text": [make_text(300, i) for i in range(4)]})
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(tmp_path / "ds")
    proc = cli("evaluate", "-c", str(model_file), "--data", str(tmp_path / "ds"), "--split", "test",
                   "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert_one_line_error(proc, "no split 'test'")
    other = tmp_path / "other.pt"
    save_model_file(small_model, other, extra={"tokenizer": "cl100k_base-0000"})
    assert_one_line_error(cli("evaluate", "-c", str(other), "--data", text), "tokenizer")


def test_evaluate_offline_names_a_way_to_score_local_text(cli, tmp_path, model_file):
    """The hint fits every command that reads --data: evaluate trains nothing."""
    proc = cli("evaluate", "-c", str(model_file), "--data", "wikitext-2", "--cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(proc, "cannot reach the Hugging Face hub", "use local text instead, e.g. --data shakespeare")


def test_export_writes_a_folder_transformers_loads(cli, tmp_path, model_file, small_model):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    proc = cli("export", "-c", str(model_file), "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (hf(idx).logits - small_model(idx)[0]).abs().max().item() < 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["Hello, world!  naïve 東京 🚀\n\n x", "it's 2026: 1,234 <|endoftext|> next"]:
        assert tokenizer.encode(text) == encode(text)
    assert_one_line_error(cli("export", "-c", str(model_file), "--out-dir", str(out)), "--force")
    assert cli("export", "-c", str(model_file), "--out-dir", str(out), "--force").returncode == 0


def test_evaluation_scores_the_text_only_and_matches_transformers(cli, tmp_path, hf_dir):
    """Three files (three documents) scored through the command; the reference runs transformers'
    GPT2LMHeadModel on the same windows: the text's tokens after an <|endoftext|>, documents joined by
    <|endoftext|>, every token of the text a target once and no <|endoftext|> ever a target."""
    transformers = pytest.importorskip("transformers")
    import torch.nn.functional as F

    from examplegpt.tokenizer import EOT_ID, get_tokenizer

    docs = tmp_path / "docs"
    docs.mkdir()
    texts = [make_text(150 + 40 * i, 20 + i) for i in range(3)]
    for i, text in enumerate(texts):
        (docs / f"{i}.txt").write_text(text)
    proc = cli("evaluate", "-c", str(hf_dir), "--data", str(docs), "--json", "--stride", "48")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])

    encoded = get_tokenizer().encode_ordinary_batch(texts)
    stream = torch.tensor([EOT_ID] + [t for ids in encoded for t in ids + [EOT_ID]])
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start, end, first in window_plan(len(stream), 128, 48):
            logits = hf(stream[None, start:end]).logits[0]  # (T, V)
            targets = stream[start + 1 : end + 1]
            scored = (torch.arange(start + 1, end + 1) >= first) & (targets != EOT_ID)
            total += F.cross_entropy(logits[scored], targets[scored], reduction="sum").item()
            count += int(scored.sum())
    assert result["tokens_scored"] == count == sum(map(len, encoded))
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
