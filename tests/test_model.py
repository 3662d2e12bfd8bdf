import math

import pytest
import torch
import torch.nn.functional as F

from examplegpt import GPT, GPTConfig
from examplegpt.config import PRESETS
from examplegpt.loss import fused_linear_cross_entropy

from .conftest import tiny_config


def test_default_config_has_gpt2_small_parameter_count():
    model = GPT(GPTConfig())
    assert model.num_parameters() == 124_439_808  # GPT-2 small, as published
    unpadded = GPT(GPTConfig(vocab_pad_multiple=1))
    assert sum(p.numel() for p in unpadded.parameters()) == 124_439_808


@pytest.mark.parametrize("name", ["tiny", "350M"])
def test_presets_build(name):
    config = GPTConfig(**PRESETS[name])
    assert config.d_model % config.num_heads == 0
    if name == "350M":  # GPT-2 medium: 354,823,168 with its 1024 positions
        model = GPT(config)
        assert model.num_parameters() == 354_823_168


def plain_loss(model, idx, targets):
    """The reference: the whole (B, T, V) logits, then F.cross_entropy."""
    logits, _ = model(idx)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


def test_forward_shapes_and_loss(tiny_model):
    idx = torch.randint(0, 50257, (3, 17))
    logits, loss = tiny_model(idx)
    assert logits.shape == (3, 17, 50257) and loss is None
    logits, loss = tiny_model(idx, targets=torch.randint(0, 50257, (3, 17)))
    assert logits is None and loss.shape == ()
    # a freshly initialised model is close to uniform over the vocabulary
    assert abs(loss.item() - math.log(50257)) < 0.5


def test_lm_head_is_tied_and_padding_rows_are_zero(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.transformer.wte.weight
    assert tiny_model.transformer.wte.weight.shape[0] == 50304  # padded to a multiple of 64
    assert tiny_model.transformer.wte.weight[50257:].abs().sum() == 0


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    config = tiny_config(d_model=256, num_layers=8, d_ff=1024)
    model = GPT(config)
    expected = 0.02 / math.sqrt(2 * config.num_layers)
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_attention_is_causal(tiny_model):
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = torch.randint(0, 50257, (10,))
    with torch.no_grad():
        a, _ = tiny_model(idx)
        b, _ = tiny_model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_fused_loss_equals_the_plain_loss_and_gradients(tiny_model, chunk_rows):
    idx = torch.randint(0, 50257, (2, 40))
    targets = idx.roll(-1, dims=1)
    targets[0, :5] = -1  # ignored positions
    full = plain_loss(tiny_model, idx, targets)
    full.backward()
    expected = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    h = tiny_model.hidden_states(idx)
    fused = fused_linear_cross_entropy(h, tiny_model.lm_head.weight, targets, 50257, chunk_rows=chunk_rows)
    (fused * 3).backward()  # the upstream gradient scales the saved gradients
    torch.testing.assert_close(fused, full)
    for p, grad in zip(tiny_model.parameters(), expected):
        torch.testing.assert_close(p.grad, 3 * grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tiny_model(idx, targets)[1], full)  # the model's own loss is the fused one


def test_fused_loss_under_bf16_autocast_follows_the_plain_loss(tiny_model):
    idx = torch.randint(0, 50257, (2, 40))
    targets = idx.roll(-1, dims=1)
    with torch.autocast("cpu", torch.bfloat16):
        plain = plain_loss(tiny_model, idx, targets)
        plain.backward()
        expected = tiny_model.lm_head.weight.grad.clone()
        tiny_model.zero_grad()
        _, fused = tiny_model(idx, targets)
        fused.backward()
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=1e-2)
    error = (tiny_model.lm_head.weight.grad - expected).norm() / expected.norm()
    assert error < 1e-2  # both are bf16 products: elementwise they differ by bf16 rounding


def test_sequence_longer_than_context_is_refused(tiny_model):
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model(torch.zeros(1, 129, dtype=torch.long))


def test_fused_loss_without_autograd_is_the_same_loss(tiny_model):
    idx = torch.randint(0, 50257, (2, 30))
    targets = idx.roll(-1, dims=1)
    targets[1, :3] = -1
    with torch.no_grad():
        plain = plain_loss(tiny_model, idx, targets)
        _, fused = tiny_model(idx, targets)
    torch.testing.assert_close(fused, plain)
    assert not fused.requires_grad
