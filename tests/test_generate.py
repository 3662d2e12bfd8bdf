"""The sampler: exact KV-cached decoding, the filters on hand-built distributions, and the generate command."""

import json

import pytest
import torch

from examplegpt import GPT
from examplegpt.errors import UserError
from examplegpt.generate import generate
from examplegpt.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    choose_next,
    min_p_filter,
    next_token_probs,
    sample_from,
    top_k_filter,
    top_p_filter,
)
from examplegpt.text import TextStream
from examplegpt.tokenizer import EOT_ID, encode
from examplegpt.weights import save_model_file

from .conftest import assert_one_line_error, eos_only_model, fresh_process, peaked_model, tiny_config

NEG = float("-inf")


def greedy_without_cache(model, idx, steps):
    """Reference: recompute the whole sequence for every new token (the LM head on its last position only)."""
    for _ in range(steps):
        h = model.hidden_states(idx[:, -model.config.max_seq_len :])  # (B, T, C)
        idx = torch.cat([idx, model.logits(h[:, -1]).argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.fixture(scope="module")
def spread_model():
    return peaked_model(max_seq_len=256)


def test_kv_cache_greedy_equals_full_recompute_for_200_tokens(spread_model):
    prompt = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = greedy_without_cache(spread_model, prompt, 200)
    assert torch.equal(generate(spread_model, prompt, 200, temperature=0), expected)


def test_generation_continues_past_the_context_with_a_sliding_window():
    torch.manual_seed(0)
    model = GPT(tiny_config(max_seq_len=32)).eval()
    out = generate(model, torch.zeros(1, 30, dtype=torch.long), 100, temperature=0)
    assert out.shape == (1, 130)
    # right after a slide the cache holds the last 16 tokens: same as recomputing on that window
    with torch.no_grad():
        window = out[:, 32 - 16 : 32]
        logits, _ = model(window)
    assert logits[0, -1].argmax().item() == out[0, 32].item()


@pytest.mark.parametrize("training", [True, False])
def test_generate_samples_without_dropout_and_leaves_the_models_mode_as_it_was(training):
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.5)).train(training)
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        expected = greedy_without_cache(model.eval(), prompt, 8)  # dropout off: one answer
    model.train(training)
    assert torch.equal(generate(model, prompt, 8, temperature=0), expected)
    assert model.training == training and all(m.training == training for m in model.modules())


def test_seeded_sampling_is_reproducible_and_samples_differ(spread_model):
    prompt = torch.tensor([encode("Once upon a time")] * 3)
    run = lambda seed: generate(spread_model, prompt, 30, temperature=1.0, top_p=0.95,
                                generator=torch.Generator().manual_seed(seed))  # fmt: skip
    a, b = run(7), run(7)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # the batch rows are independent samples


def test_top_k_keeps_the_k_largest_and_their_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 5.0, 0.0]])
    assert top_k_filter(logits, 1).tolist() == [[NEG, 5.0, NEG, 5.0, NEG]]  # a tie at the top stays
    assert top_k_filter(logits, 3).tolist() == [[NEG, 5.0, 3.0, 5.0, NEG]]
    assert torch.equal(top_k_filter(logits, 5), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.55) == [True, True, True, False]  # the two tied at 0.2 are both kept
    assert kept(0.95) == [True, True, True, True]
    assert torch.equal(top_p_filter(logits, 1.0), logits)  # p = 1 keeps everything


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = torch.tensor([[0.6, 0.3, 0.06, 0.04]]).log()
    assert torch.isfinite(min_p_filter(logits, 0.1))[0].tolist() == [True, True, False, False]


def test_sampling_never_picks_a_filtered_token():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).repeat(2000, 1)
    picks = choose_next(
        logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=2), generator=torch.Generator().manual_seed(0)
    )
    assert set(picks.tolist()) == {1, 2}
    assert (choose_next(logits[:1], SamplingParams(temperature=0)) == 1).all()


def test_repetition_penalty_discourages_repeats(spread_model):
    prompt = torch.tensor([encode("the the the")])
    plain = generate(spread_model, prompt, 40, temperature=0)
    penalised = generate(spread_model, prompt, 40, temperature=0, repetition_penalty=5.0)
    assert len(set(penalised[0, 3:].tolist())) > len(set(plain[0, 3:].tolist()))


def test_text_stream_never_splits_a_character():
    text = "naïve 東京 🚀 ok"
    stream = TextStream()
    pieces = [stream.push(t) for t in encode(text)] + [stream.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_eos_ends_a_row_and_pads_it():
    model = eos_only_model()
    out = generate(model, torch.tensor([[5, 6]]), 10, temperature=0, eos_id=EOT_ID)
    assert out.tolist() == [[5, 6, EOT_ID]]  # generation ended at the first <|endoftext|>
    assert generate(model, torch.tensor([[5, 6]]), 4, temperature=0).tolist() == [[5, 6] + [EOT_ID] * 4]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, spread_model):
    path = tmp_path_factory.mktemp("model") / "gpt_model.pt"
    save_model_file(spread_model, path)
    return path


def test_cli_json_num_samples_and_seed(cli, model_file):
    args = ["generate", "-c", str(model_file), "-p", "Hello", "-n", "12", "--seed", "3", "--num-samples", "3",
            "--json", "--ignore-eos", "--top-k", "50", "--min-p", "0.01", "--repetition-penalty", "1.2"]  # fmt: skip
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(records) == 3 and all(r["prompt"] == "Hello" and r["tokens"] == 12 for r in records)
    again = [json.loads(line) for line in cli(*args).stdout.splitlines()]
    assert [r["text"] for r in again] == [r["text"] for r in records]  # same seed, same text
    assert len({r["text"] for r in records}) > 1


def test_cli_streams_prompt_then_continuation_and_honours_stop(cli, model_file, spread_model):
    greedy = cli("generate", "-c", str(model_file), "-p", "Hello", "-n", "30", "-t", "0", "--ignore-eos")
    assert greedy.returncode == 0 and greedy.stdout.startswith("Hello")
    continuation = greedy.stdout[len("Hello") : -1]
    stop_text = continuation[5:9]
    stopped = cli("generate", "-c", str(model_file), "-p", "Hello", "-n", "30", "-t", "0", "--stop", stop_text)
    expected = "Hello" + continuation[: continuation.find(stop_text)] + "\n"
    assert stopped.stdout == expected


def test_cli_reads_the_prompt_from_stdin_and_interactively(cli, model_file):
    piped = cli("generate", "-c", str(model_file), "-n", "3", "-t", "0", stdin="From a pipe")
    assert piped.returncode == 0 and piped.stdout.startswith("From a pipe")
    dash = cli("generate", "-c", str(model_file), "-p", "-", "-n", "3", "-t", "0", stdin="Dash")
    assert dash.stdout.startswith("Dash")
    chat = cli("generate", "-c", str(model_file), "--interactive", "-n", "3", "-t", "0", stdin="one\ntwo\n")
    assert chat.returncode == 0
    assert chat.stdout.count("one") >= 1 and "two" in chat.stdout


def test_interactive_refuses_a_line_that_is_not_utf8_and_goes_on(cli, model_file):
    chat = cli("generate", "-c", str(model_file), "--interactive", "-n", "3", "-t", "0", stdin=b"caf\xe9\nnext\n")
    assert chat.returncode == 1  # as a bad prompt without --interactive, though the session went on
    assert chat.stderr.splitlines() == ["error: the prompt on line 1 of stdin is not valid UTF-8 (byte 3); skipped"]
    assert chat.stdout.startswith("next") and "caf" not in chat.stdout


def test_cli_long_prompt_is_cut_from_the_left_with_a_warning(cli, model_file):
    proc = cli("generate", "-c", str(model_file), "-p", "word " * 400, "-n", "2", "-t", "0")
    assert proc.returncode == 0
    assert "keeping the last 255" in proc.stderr


@pytest.mark.parametrize(
    "args, stdin, words",
    [
        (["-t", "-1"], None, ["temperature"]),
        (["-t", "nan"], None, ["temperature"]),
        (["--repetition-penalty", "nan"], None, ["repetition_penalty"]),
        (["--top-p", "-0.1"], None, ["top_p"]),
        (["--top-p", "1.5"], None, ["top_p"]),
        (["--top-k", "-1"], None, ["top_k"]),
        (["-n", "0"], None, ["max_new_tokens"]),
        (["-n", "many"], None, ["-n"]),
        (["-t", "inf"], None, ["temperature must be a finite number"]),
        (["--repetition-penalty", "inf"], None, ["repetition_penalty must be a finite number"]),
        (["--stop", ""], None, ["stop must not be empty"]),
        (["-p", ""], None, ["prompt is empty"]),
        (["-p", "-"], b"\xff\xfe bad", ["not valid UTF-8"]),
        # bytes that are not UTF-8 on the command line, as Python hands them on (PEP 383)
        (["-p", b"\xed\xa0\x80abc".decode("utf-8", "surrogateescape")], None, ["--prompt", "not valid UTF-8 (byte 0)"]),
        (["--dtype", "int4"], None, ["precision", "int4"]),
        (["--bogus"], None, ["unrecognized"]),
    ],
)
def test_cli_bad_generation_input_is_one_line(cli, model_file, args, stdin, words):
    base = ["generate", "-c", str(model_file)] + ([] if "-p" in args else ["-p", "hi"])
    assert_one_line_error(cli(*base, *args, stdin=stdin or b""), *words)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_verbose_says_so_when_no_weight_was_packed(cli, model_file, monkeypatch, precision):
    from examplegpt import cpu_inference

    if precision == "bf16" and cpu_inference.can_pack(torch.ones(1, dtype=torch.bfloat16)):
        pytest.skip("oneDNN packs bfloat16 weights on this CPU")
    fresh_process(monkeypatch)
    proc = cli("generate", "-c", str(model_file), "-p", "Hello", "-n", "2", "--device", "cpu",
               "--precision", precision, "--verbose")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"cpu_inference: {cpu_inference.NONE_TRIED}: {cpu_inference.NONE_TRIED_BECAUSE}" in proc.stderr


@pytest.mark.parametrize("kind", ["missing", "junk", "directory", "hostile"])
def test_cli_refuses_files_that_are_not_models(cli, tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "junk":
        path.write_bytes(b"\x00junk" * 100)
    elif kind == "directory":
        path.mkdir()
    elif kind == "hostile":
        import os

        class Hostile:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'pwned'}",))

        torch.save({"model": Hostile(), "model_config": {}}, path)
    proc = cli("generate", "-c", str(path), "-p", "hi")
    assert_one_line_error(proc, str(path))
    assert not (tmp_path / "pwned").exists()


def test_sampling_follows_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20_000, 1)
    picks = sample_from(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=5) / len(picks)
    assert counts[1] == 0 and counts[4] == 0
    assert torch.allclose(counts, probs[0], atol=0.015)  # 3 standard deviations at n = 20,000 is < 0.011
    first_only = sample_from(torch.tensor([[1.0, 0.0, 0.0]]), torch.Generator().manual_seed(1))
    assert first_only.tolist() == [0]


def greedy_by_the_sliding_definition(model, idx, steps):
    """README's definition: the model sees at most max_seq_len tokens; when the next token would not
    fit, the window restarts from the last max_seq_len // 2 tokens and grows again."""
    context = model.config.max_seq_len
    tokens = idx[0].tolist()
    start = max(0, len(tokens) - context)
    for _ in range(steps):
        if len(tokens) - start > context:
            start = len(tokens) - context // 2
        with torch.no_grad():
            logits, _ = model(torch.tensor([tokens[start:]]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("prompt_len", [5, 16, 23])
def test_generation_past_the_context_follows_the_sliding_definition(prompt_len):
    model = peaked_model(max_seq_len=16)
    prompt = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    expected = greedy_by_the_sliding_definition(model, prompt, 60)
    assert generate(model, prompt, 60, temperature=0)[0].tolist() == expected


def test_json_token_count_is_what_a_stopped_text_holds(model_file, spread_model, capsys):
    """Three sampled rows; the first stops early while the others go on: each counts its own tokens."""
    from examplegpt.cli import main
    from examplegpt.tokenizer import decode

    prompt = encode("Hello")
    generator = [torch.Generator().manual_seed(3 + j) for j in range(3)]  # as the command seeds its samples
    rows = generate(spread_model, torch.tensor([prompt] * 3), 30, temperature=1.0, top_p=1.0, generator=generator)
    rows = [row[len(prompt) :] for row in rows.tolist()]
    stop_text = decode(rows[0])[4:7]
    holds = [next((k for k in range(1, 31) if stop_text in decode(row[:k])), 30) for row in rows]
    assert holds[0] < 30 and max(holds) > holds[0]  # the case at issue: one row stops before another
    args = ["generate", "-c", str(model_file), "-p", "Hello", "-n", "30", "-t", "1", "--top-p", "1", "--seed", "3"]
    assert main([*args, "--num-samples", "3", "--ignore-eos", "--json", "--stop", stop_text]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["tokens"] for r in records] == holds
    assert records[0]["text"] == decode(rows[0])[: decode(rows[0]).find(stop_text)]


@pytest.mark.parametrize("top_p", ["1.0", "0.9"])
def test_cli_tiny_temperature_is_greedy(model_file, capsys, top_p):
    from examplegpt.cli import main

    args = ["generate", "-c", str(model_file), "-p", "Hello", "-n", "12", "--ignore-eos", "--top-p", top_p]
    assert main([*args, "-t", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "-t", "1e-40"]) == 0
    assert capsys.readouterr().out == greedy


def test_generate_without_a_model_file_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    from examplegpt.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "-p", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpt_model.pt" in err[0] and "example.py train" in err[0] and "Hugging Face" in err[0]


@pytest.mark.parametrize("tiny", [1e-300, 5e-324])
def test_a_top_p_or_temperature_below_float32s_range_is_greedy(spread_model, tiny):
    """p and temperature are Python floats that become 0 in float32: the filter still keeps the best token
    (it used to index -1 and raise), and the division by the temperature does not make the best logit NaN."""
    with torch.no_grad():
        logits = spread_model(torch.tensor([[1, 2, 3]]))[0][:, -1]  # (1, V)
    kept = torch.isfinite(top_p_filter(logits, tiny))[0]
    assert kept.nonzero().flatten().tolist() == [int(logits.argmax())]
    assert choose_next(logits, SamplingParams(temperature=tiny, top_p=0.9)).tolist() == logits.argmax(dim=-1).tolist()
    assert choose_next(logits, SamplingParams(temperature=1.0, top_p=tiny)).tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("penalty", [1e-300, 1e-40, 1e300])
def test_an_extreme_repetition_penalty_still_samples_a_finite_distribution(spread_model, penalty):
    """A penalty whose division overflows float32 used to make the seen tokens' logits inf, the distribution
    NaN, and the sample the last id (<|endoftext|>) whatever the model said."""
    with torch.no_grad():
        logits = spread_model(torch.tensor([[1, 2, 3]]))[0][:, -1]  # (1, V)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[0, logits[0].topk(5).indices] = True  # the five best tokens were seen
    probs = next_token_probs(
        apply_repetition_penalty(logits, seen, penalty), SamplingParams(temperature=1.0, top_p=1.0)
    )
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-4
    drawn = int(
        choose_next(
            apply_repetition_penalty(logits, seen, penalty),
            SamplingParams(temperature=1.0, top_p=1.0),
            generator=torch.Generator().manual_seed(0),
        )
    )
    assert bool(seen[0, drawn]) == (penalty < 1)  # a tiny penalty boosts the seen tokens, a huge one buries them


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_attention_on_a_gpu_leaves_cudnn_out(monkeypatch):
    """cuDNN's attention plans a kernel per shape, and decoding meets a new shape every step (BENCHMARKS.md)."""
    from examplegpt import kv_cache

    cudnn_on = []
    real = kv_cache.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        cudnn_on.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(kv_cache.F, "scaled_dot_product_attention", spy)
    model = GPT(tiny_config()).cuda().to(torch.bfloat16).eval()
    generate(model, torch.zeros(1, 4, dtype=torch.long, device="cuda"), 3, temperature=0)
    assert cudnn_on and not any(cudnn_on)


def test_cached_attention_leaves_out_only_cudnn_and_keeps_the_users_switches():
    from examplegpt.kv_cache import without_cudnn_attention

    cuda = torch.backends.cuda
    before = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled())
    cuda.enable_cudnn_sdp(True)
    cuda.enable_flash_sdp(False)  # the user's own choice
    try:
        with without_cudnn_attention():
            inside = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled())
        assert inside == (False, False, before[1])
        assert cuda.cudnn_sdp_enabled() and not cuda.flash_sdp_enabled()  # restored after the block
    finally:
        cuda.enable_flash_sdp(before[0])
        cuda.enable_cudnn_sdp(before[2])


def test_a_model_file_with_a_context_of_one_is_refused_in_one_line(cli, tmp_path, spread_model):
    """Found by an audit: GPTConfig took max_seq_len=1, and `generate` on such a model cropped its prompt to
    nothing and crashed (generation keeps half the context when it slides)."""
    with pytest.raises(UserError, match="max_seq_len must be at least 2, got 1"):
        tiny_config(max_seq_len=1)
    path = tmp_path / "one.pt"
    save_model_file(spread_model, path)
    state = torch.load(path, weights_only=False)
    state["model_config"]["max_seq_len"] = 1
    state["model"]["transformer.wpe.weight"] = state["model"]["transformer.wpe.weight"][:1].clone()
    torch.save(state, path)
    assert_one_line_error(cli("generate", "-c", str(path), "-p", "Hello", "-n", "3"), "max_seq_len")


@pytest.mark.parametrize(
    "idx, new, words",
    [
        (torch.tensor([1, 2]), 2, "shape (B, T)"),  # one row given without its batch dimension
        (torch.zeros(1, 0, dtype=torch.long), 2, "T >= 1"),  # an empty prompt
        (torch.tensor([[1, 2]]), -1, "max_new_tokens must be a whole number"),
        (torch.tensor([[1, 2]]), 2.5, "max_new_tokens must be a whole number"),
    ],
)
def test_generate_refuses_malformed_arguments_with_a_value_error(spread_model, idx, new, words):
    """Found by an audit: these ended in an IndexError or a tensor-size RuntimeError from deep inside."""
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        generate(spread_model, idx, new, temperature=0)


def test_generated_tokens_can_be_a_training_batch(spread_model):
    """Found by an audit: generate returned an inference-mode tensor, which autograd refuses to save."""
    out = generate(spread_model, torch.tensor([[1, 2, 3]]), 5, temperature=0)
    assert not out.is_inference()
    model = GPT(tiny_config(max_seq_len=256))
    _, loss = model(out[:, :-1], targets=out[:, 1:])
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_sample_j_of_num_samples_is_the_one_sample_run_seeded_with_seed_plus_j(cli, model_file):
    """Found by an audit: the samples all drew from one generator, where `serve` seeds choice j of n with seed + j,
    so the CLI's first sample differed from a one-sample run with the same seed."""
    args = ["generate", "-c", str(model_file), "-p", "Hello", "-n", "12", "--json", "--ignore-eos", "--no-fast-cpu"]
    together = cli(*args, "--seed", "3", "--num-samples", "3")
    assert together.returncode == 0, together.stderr
    texts = [json.loads(line)["text"] for line in together.stdout.splitlines()]
    alone = [json.loads(cli(*args, "--seed", str(3 + j)).stdout)["text"] for j in range(3)]
    assert texts == alone and len(set(texts)) > 1
