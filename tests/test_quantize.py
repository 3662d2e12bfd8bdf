"""Inference precision: int8 weight-only and bf16 against float32, on the product and on a trained model."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn as nn

from examplegpt import GPT, generate
from examplegpt.config import EvaluateConfig, GenerateConfig, ServeConfig
from examplegpt.device import inference_precision, prepare_for_inference
from examplegpt.errors import UserError
from examplegpt.evaluate import sliding_window_nll
from examplegpt.quantize import (
    DEQUANTIZE_FROM_ROWS,
    Int8Linear,
    int8_kernel_works,
    many_rows_per_call,
    quantize_int8,
    weight_bytes,
)
from examplegpt.tokenizer import EOT_ID, encode

from .conftest import make_text, tiny_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("rows", [1, 5, DEQUANTIZE_FROM_ROWS + 3])
@pytest.mark.parametrize("many_rows", [False, True])  # the int8 kernel; the dequantized product from 16 rows
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_close_to_the_float_product(rows, many_rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        linear.weight[7].zero_()  # an all-zero row (the vocabulary's padding) must not divide by zero
    quantized = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(2, rows, 96)
    expected = linear(x)
    with many_rows_per_call(quantized) if many_rows else contextlib.nullcontext():
        got = quantized(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    # int8 rounding is at most half a step of max|W|/127 per weight; bf16 activations add ~0.4%
    assert (got - expected).abs().max() < 0.03 * expected.abs().max()
    assert torch.all(got[..., 7] == (linear.bias[7] if bias else 0))
    # the dequantized weight is within half a quantization step of the original
    step = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((quantized.weight - linear.weight).abs() <= step * 0.5 + 1e-6)


def test_a_rows_numbers_do_not_depend_on_the_rows_beside_it():
    """So that a request's tokens do not depend on what else the server decodes with it."""
    torch.manual_seed(0)
    quantized = Int8Linear(torch.randn(64, 96), torch.randn(64))
    x = torch.randn(3 * DEQUANTIZE_FROM_ROWS, 96)
    alone = torch.cat([quantized(row[None]) for row in x])  # (rows, 64)
    for rows in (2, DEQUANTIZE_FROM_ROWS - 1, DEQUANTIZE_FROM_ROWS, 3 * DEQUANTIZE_FROM_ROWS):
        assert torch.equal(quantized(x[:rows]), alone[:rows]), rows


def test_the_int8_kernel_is_found_on_this_build():
    assert int8_kernel_works()  # else every product silently runs the slow dequantized path


def test_int8_replaces_every_linear_and_the_tied_head():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    float_bytes = weight_bytes(model)
    embedding = model.transformer.wte.weight
    quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    assert model.transformer.wte.weight is embedding and embedding.dtype == torch.float32  # looked up in float
    assert weight_bytes(model) < 0.3 * float_bytes  # a quarter, plus scales, biases and LayerNorms


def test_precision_is_chosen_in_one_place():
    assert inference_precision("auto", CPU) == "fp32"  # exact on CPU unless asked
    assert inference_precision("int8", CPU) == "int8"
    for cls in (GenerateConfig, EvaluateConfig, ServeConfig):
        assert cls(precision="int8").precision == "int8"
        assert cls(precision="bfloat16").precision == "bf16"
        with pytest.raises(UserError, match="precision"):
            cls(precision="int4")


def trained_tiny_model(steps: int = 40) -> tuple[GPT, torch.Tensor]:
    """A tiny model trained for a few seconds on seeded English sentences (peaked, realistic weights),
    and held-out tokens of the same kind of text."""
    torch.manual_seed(0)
    model = GPT(tiny_config(d_model=48, num_heads=4, num_layers=2, d_ff=192, max_seq_len=64))
    train = torch.tensor(encode(make_text(6000, 1)))
    held_out = torch.tensor(encode(make_text(1500, 2)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(train) - 65, (8,), generator=generator)
        batch = torch.stack([train[s : s + 65] for s in starts])  # (8, 65)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False), held_out


@pytest.fixture(scope="module")
def trained() -> tuple[GPT, torch.Tensor]:
    return trained_tiny_model()


def perplexity(model: GPT, tokens: torch.Tensor) -> float:
    total, count = sliding_window_nll(model, tokens.numpy(), stride=32, batch_size=8, device=CPU)
    return math.exp(total / count)


@pytest.mark.slow  # trains a model for a few seconds
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_reduced_precision_keeps_perplexity_within_one_percent(trained, precision):
    model, held_out = trained
    exact = perplexity(model, held_out)
    assert exact < 100  # the model learned the text: the comparison is on real, peaked distributions
    reduced = perplexity(prepare_for_inference(copy.deepcopy(model), precision, CPU), held_out)
    assert abs(reduced / exact - 1) < 0.01, (precision, exact, reduced)


@pytest.mark.slow  # trains a model for a few seconds
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_reduced_precision_greedy_text_agrees_with_float32(trained, precision):
    model, held_out = trained
    prompt = held_out[None, :16]  # (1, 16)
    exact = generate(model, prompt, 256, temperature=0)[0, 16:]
    reduced_model = prepare_for_inference(copy.deepcopy(model), precision, CPU)
    reduced = generate(reduced_model, prompt, 256, temperature=0)[0, 16:]
    agreement = (exact == reduced).float().mean().item()
    assert agreement >= 0.95, (precision, agreement)


def test_generate_command_takes_int8(tmp_path, cli):
    from examplegpt.weights import save_model_file

    torch.manual_seed(0)
    save_model_file(GPT(tiny_config()), tmp_path / "m.pt")
    proc = cli("generate", "-c", str(tmp_path / "m.pt"), "-p", "Hello", "-n", "5", "--precision", "int8", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"tokens": 5' in proc.stdout
    proc = cli("generate", "-c", str(tmp_path / "m.pt"), "-p", "Hello", "--precision", "int4")
    assert proc.returncode != 0 and "precision" in proc.stderr


def test_the_server_engine_runs_an_int8_model_as_generate_does():
    from examplegpt.batching import BatchEngine, SamplingParams

    from .test_batching import Collector

    torch.manual_seed(0)
    model = prepare_for_inference(GPT(tiny_config()), "int8", CPU)
    prompt = torch.randint(0, 50257, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = generate(model, torch.tensor([prompt]), 12, temperature=0, eos_id=EOT_ID)[0, 8:].tolist()
    engine = BatchEngine(model, max_batch=2)
    engine.start()
    try:
        collector = Collector()
        engine.submit(prompt, SamplingParams(max_tokens=12, temperature=0), collector)
        assert collector.wait().tokens == expected
    finally:
        engine.shutdown(drain=False)
        engine.join(30)


def test_an_int8_request_gets_the_same_numbers_alone_and_among_many():
    """More rows decoding at once than DEQUANTIZE_FROM_ROWS (where the product used to switch kernels), prompts
    prefilled in chunks: here each request's tokens and log-probabilities are bit for bit those it gets alone."""
    from examplegpt.batching import BatchEngine, SamplingParams

    from .test_batching import Collector

    torch.manual_seed(0)
    model = prepare_for_inference(GPT(tiny_config()), "int8", CPU)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50257, (3 + i,), generator=generator).tolist() for i in range(DEQUANTIZE_FROM_ROWS + 4)]
    params = SamplingParams(max_tokens=6, temperature=0, stop_at_eos=False, logprobs=0)

    def run(max_batch: int) -> list[list[tuple[int, float]]]:
        engine = BatchEngine(model, max_batch=max_batch, max_queue=len(prompts), prefill_chunk=8)
        collectors = [Collector() for _ in prompts]
        for prompt, collector in zip(prompts, collectors):
            engine.submit(prompt, params, collector)
        engine.start()
        try:
            return [[(e.token, e.logprob) for e in c.wait().events] for c in collectors]
        finally:
            engine.shutdown(drain=False)
            engine.join(30)

    assert run(max_batch=len(prompts)) == run(max_batch=1)
