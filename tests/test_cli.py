"""One command line: help generated from one place, the same names everywhere, and what the commands say."""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from examplegpt.cli import build_parser
from examplegpt.config import DataConfig, GenerateConfig, GPTConfig
from examplegpt.data.corpus import resolve_source
from examplegpt.data.token_cache import cache_folder
from examplegpt.generate import generate
from examplegpt.sampling import SamplingParams, filter_logits
from examplegpt.weights import save_model_file

from .conftest import MICRO_MODEL, REPO, assert_one_line_error, make_text, peaked_model

COMMANDS = build_parser()._subparsers._group_actions[0].choices  # name -> the command's parser


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.pt"
    save_model_file(peaked_model(max_seq_len=64), path)
    return path


def help_of(command: str) -> str:
    return " ".join(COMMANDS[command].format_help().split())  # argparse's line wrapping undone


# --- --help ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_states_each_default_once_and_never_none(command):
    text = help_of(command)
    assert "(default: None)" not in text
    assert not re.search(r"\(default: [^)]*\)\.? \(default:", text), text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_a_description_and_a_type(command):
    for action in COMMANDS[command]._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help and len(action.help) > 10, (command, action.option_strings)
        takes_value = not isinstance(action, argparse.BooleanOptionalAction) and action.nargs != 0
        if takes_value and action.option_strings:
            assert action.metavar, (command, action.option_strings)


def test_prepare_max_seq_len_has_help_and_evaluate_has_no_training_only_flags():
    assert re.search(r"--max-seq-len INT Context length", help_of("prepare"))
    evaluate = help_of("evaluate")
    for flag in ("--train-split", "--val-fraction", "--workers"):
        assert flag not in evaluate
    assert "--data SOURCE" in evaluate and "--val-split" in evaluate


def test_evaluate_config_file_may_still_name_training_settings(tmp_path):
    """The file a run was trained with names the same token cache when evaluating."""
    from examplegpt.cli import resolve
    from examplegpt.config import EvaluateConfig

    path = tmp_path / "run.toml"
    path.write_text('[data]\ntrain_split = "training"\nworkers = 1\n')
    args = build_parser().parse_args(["evaluate", "--config", str(path)])
    data = resolve(args, {"evaluate": EvaluateConfig, "data": DataConfig})["data"]
    assert (data.train_split, data.workers) == ("training", 1)


# --- the same names everywhere ----------------------------------------------------------------------------


def test_export_takes_out_dir_and_still_the_old_out():
    parser = build_parser()
    assert parser.parse_args(["export", "--out-dir", "hf"]).out_dir == "hf"
    assert parser.parse_args(["export", "--out", "hf"]).out_dir == "hf"  # older commands still work
    assert "--out-dir DIR" in help_of("export") and "--out " not in help_of("export")
    assert parser.parse_args(["train", "--out-dir", "runs/a"]).out_dir == "runs/a"


def test_export_without_a_folder_is_one_line(cli, model_file):
    assert_one_line_error(cli("export", "-c", str(model_file)), "--out-dir")


@pytest.mark.parametrize(
    "flags",
    [["-n", "100000000000000"], ["-n", "2", "--num-samples", "100000000000"], ["-n", str(2**60)]],
    ids=["new tokens", "samples", "a size past 64 bits"],
)
def test_asking_for_more_memory_than_there_is_is_one_line(cli, model_file, flags):
    """torch's CPU allocator raises a RuntimeError, Python a MemoryError: both were tracebacks."""
    proc = cli("generate", "-c", str(model_file), "-p", "hi", *flags)
    assert_one_line_error(proc, "out of memory")
    assert not proc.stdout or proc.stdout.endswith("\n")  # the echoed prompt's line is ended: see the next test


@pytest.mark.parametrize("flags", [["-n", str(10**19)], ["-n", str(2**62 + 1)], ["--num-samples", str(2**63)]])
def test_more_tokens_than_64_bits_count_is_refused_in_one_line(cli, model_file, flags):
    assert_one_line_error(cli("generate", "-c", str(model_file), "-p", "hi", *flags), "at most 2**62")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="Linux's always-full device")
def test_output_to_a_full_device_is_one_line(model_file):
    """`generate > /dev/full` (a full disk) was a traceback."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "examplegpt", "generate", "-c", str(model_file), "-p", "hi", "-n", "3"],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: no space left on the device to write the output"]


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_an_error_while_streaming_starts_its_own_line(cli, model_file, monkeypatch, error):
    """generate echoes the prompt, then each token: the error's line (stderr, often the same terminal) was
    printed on the end of the streamed one."""
    generate_module = importlib.import_module("examplegpt.generate")  # the package's `generate` is the function

    def step_then_fail(logits, *args):
        if step_then_fail.calls:
            raise error
        step_then_fail.calls += 1
        return logits.argmax(-1)

    step_then_fail.calls = 0
    monkeypatch.setattr(generate_module, "choose_next", step_then_fail)
    proc = cli("generate", "-c", str(model_file), "-p", "hi", "-n", "5", "--ignore-eos")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert proc.stdout.startswith("hi") and proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1


def test_export_to_a_name_too_long_is_one_line(cli, model_file, tmp_path):
    assert_one_line_error(cli("export", "-c", str(model_file), "--out", str(tmp_path / ("a" * 300))), "cannot write")


def test_a_preset_that_is_not_a_name_is_one_line(cli, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("preset: [a]\n")
    assert_one_line_error(cli("prepare", "--config", str(path)), "unknown preset")


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["train", "--max-step", "5"], "--max-steps"),
        (["generate", "--temprature", "0.5"], "--temperature"),
        (["evaluate", "--stirde=4"], "--stride"),
        (["trian"], "train"),
    ],
)
def test_a_misspelt_flag_or_command_gets_a_suggestion(cli, argv, suggestion):
    proc = cli(*argv)
    assert_one_line_error(proc, f"did you mean {suggestion}?")
    assert proc.returncode == 2


def test_top_k_0_and_top_p_1_are_off_and_top_p_0_keeps_the_most_likely_token_as_in_transformers(cli, model_file):
    """transformers: top_k 0 adds no TopKLogitsWarper, top_p 1.0 no TopPLogitsWarper; TopPLogitsWarper(0)
    keeps the most likely token (so does OpenAI's API): none of them is an error."""
    transformers_processors = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    reference = transformers_processors.TopPLogitsWarper(0.0)(None, logits.clone())
    assert torch.equal(
        torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.0))), torch.isfinite(reference)
    )
    assert torch.equal(filter_logits(logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=0)), logits)

    base = ["generate", "-c", str(model_file), "-p", "Hello", "-n", "8", "-t", "1", "--seed", "5", "--json"]
    text = lambda *extra: json.loads(cli(*base, *extra).stdout.splitlines()[-1])["text"]  # noqa: E731
    assert text("--top-p", "1", "--top-k", "0") == text("--top-p", "1")
    assert text("--top-p", "0") == text("-t", "0")  # greedy: the peaked model has no near-ties

    model = peaked_model(max_seq_len=64)
    prompt = torch.tensor([[1, 2, 3]])
    sample = lambda **kw: generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    assert torch.equal(sample(top_p=1.0, top_k=0), sample(top_p=1.0))
    assert torch.equal(sample(top_p=0.0), generate(model, prompt, 8, temperature=0))
    SamplingParams(max_tokens=4, top_k=0, top_p=0.0)  # the server's engine takes them too
    GenerateConfig(top_k=0, top_p=0.0)


def test_the_http_api_takes_top_k_0_and_top_p_0():
    pytest.importorskip("fastapi")
    from examplegpt.config import ServeConfig
    from examplegpt.serve import request_model

    completion_request = request_model(ServeConfig(), vocab_size=50257, capacity=16)
    body = completion_request.model_validate({"prompt": "x", "top_k": 0, "top_p": 0})
    assert (body.top_k, body.top_p) == (0, 0.0)


# --- what the commands say ----------------------------------------------------------------------------


def test_plot_of_a_missing_folder_says_so(cli, tmp_path):
    assert_one_line_error(cli("plot", str(tmp_path / "nonexist")), "no such folder", "nonexist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("plot", str(tmp_path / "empty")), "has no metrics.jsonl")


def test_a_globs_cache_folder_is_named_after_its_folder_and_pattern(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(make_text(50, 1))
    cfg = DataConfig(data=str(books / "*.txt"), cache_dir=str(tmp_path / "cache"))
    name = cache_folder(cfg, resolve_source(cfg), 33).name
    assert name.startswith("books_glob_txt-"), name
    single = DataConfig(data=str(books / "a.txt"), cache_dir=str(tmp_path / "cache"))
    assert cache_folder(single, resolve_source(single), 33).name.startswith("a.txt-")


def test_generate_json_says_the_rate_is_the_batchs(cli, model_file):
    proc = cli("generate", "-c", str(model_file), "-p", "Hi", "-n", "6", "--num-samples", "2", "--json",
               "--ignore-eos", "--seed", "1")  # fmt: skip
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 2 and all("tokens_per_second" not in r for r in records)
    assert records[0]["batch_tokens_per_second"] == records[1]["batch_tokens_per_second"] > 0


@pytest.mark.slow
def test_train_prints_a_readable_configuration_and_keeps_it_in_the_run_folder(cli, tmp_path, corpus):
    out = tmp_path / "run"
    proc = cli("train", *MICRO_MODEL, "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
               "--out-dir", str(out), "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "1",
               "--eval-windows", "2", "--device", "cpu", "--no-amp")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 400  # not one ~1,000-character JSON line
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["train"]["max_steps"] == 1
    assert "1 accumulation step)" in proc.stdout
    model = GPTConfig(d_model=32, num_heads=2, num_layers=2, d_ff=64, max_seq_len=32)
    from examplegpt import GPT

    gpt = GPT(model)
    counts = f"model {gpt.num_parameters():,} parameters ({sum(p.numel() for p in gpt.parameters()):,} with the vocabulary's padding rows)"
    assert counts in proc.stdout
