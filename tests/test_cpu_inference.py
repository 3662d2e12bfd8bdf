"""Packed CPU inference: the same products as nn.Linear, packed once, packed again when the weights change."""

import pytest
import torch
import torch.nn.functional as F

from examplegpt import GPT, cpu_inference
from examplegpt.cpu_inference import can_pack, fast_cpu_inference, kv_cache_dtype, packed_weight
from examplegpt.generate import generate

from .conftest import peaked_model, tiny_config

pytestmark = pytest.mark.skipif(not can_pack(torch.ones(1)), reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(1,), (8,), (3, 5)])
def test_a_packed_linear_computes_what_nn_linear_does(dtype, tolerance, bias, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=bias).to(dtype)
    x = torch.randn(*rows, 96, dtype=dtype)
    with torch.inference_mode():
        expected = linear(x)
        with fast_cpu_inference(linear):
            packed = linear(x)
        after = linear(x)
    assert "forward" in type(linear).__dict__ and "forward" not in vars(linear)  # the class's forward is back
    assert packed.shape == expected.shape == (*rows, 200)
    assert torch.allclose(packed.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(after, expected)


def test_the_packed_weight_is_kept_and_made_again_when_the_weight_changes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    first = packed_weight(linear)
    assert packed_weight(linear) is first  # kept between generations
    with torch.no_grad():
        linear.weight.mul_(2)  # as an optimizer step would: in place
    x = torch.randn(4, 64)
    with torch.inference_mode(), fast_cpu_inference(linear):
        assert torch.allclose(linear(x), F.linear(x, linear.weight, linear.bias), atol=1e-5)
    linear.to(torch.bfloat16)  # replaced: new storage, new dtype
    with torch.inference_mode(), fast_cpu_inference(linear):
        y = linear(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), F.linear(x, linear.weight.float(), linear.bias.float()), atol=2e-2)


def test_generation_is_the_same_with_and_without_packing(monkeypatch):
    model = peaked_model(max_seq_len=64)
    prompt = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(1))
    packed = generate(model, prompt, 80, temperature=0)
    assert model.lm_head in cpu_inference._packed_weights  # the packed path did run
    monkeypatch.setattr(cpu_inference, "can_pack", lambda weight: False)
    assert torch.equal(generate(model, prompt, 80, temperature=0), packed)


def test_bfloat16_logits_under_fast_cpu_inference_follow_the_plain_model():
    torch.manual_seed(0)
    model = GPT(tiny_config(max_seq_len=64)).eval().to(torch.bfloat16)
    idx = torch.randint(0, 50257, (2, 40))
    with torch.inference_mode():
        expected, _ = model(idx)
        with fast_cpu_inference(model):
            fast, _ = model(idx)
    assert torch.allclose(fast.float(), expected.float(), atol=3e-2, rtol=3e-2)


def test_weights_made_under_inference_mode_are_packed_afresh_each_time():
    with torch.inference_mode():
        linear = torch.nn.Linear(64, 32)
        x = torch.randn(4, 64)
        with fast_cpu_inference(linear):
            before = linear(x)
        linear.weight.mul_(2)  # an inference tensor changes without a version counter to show it
        with fast_cpu_inference(linear):
            after = linear(x)
    assert torch.allclose(after, F.linear(x, linear.weight, linear.bias), atol=1e-5)
    assert not torch.allclose(after, before)


def test_a_bfloat16_model_on_cpu_decodes_over_a_float32_cache_as_it_would_recompute():
    model = peaked_model(max_seq_len=64).to(torch.bfloat16)
    assert kv_cache_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32
    prompt = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, 40, temperature=0)
    with torch.inference_mode():  # the reference: the whole sequence again for every token, no cache
        for step in range(8, 48):
            logits, _ = model(out[:, :step])
            assert torch.equal(logits[:, -1].float().argmax(-1), out[:, step])


def test_a_pytorch_whose_onednn_ops_compute_otherwise_runs_unpacked(monkeypatch):
    cpu_inference._onednn_packs_right.cache_clear()
    monkeypatch.setattr(cpu_inference, "_packed_forward", lambda weight, bias, x: torch.zeros(x.shape[0], 24))
    try:
        assert not can_pack(torch.ones(2, 2))
        linear = torch.nn.Linear(16, 24)
        x = torch.randn(3, 16)
        with torch.inference_mode(), fast_cpu_inference(linear):
            assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    finally:
        cpu_inference._onednn_packs_right.cache_clear()  # the next test tries the real ops again
