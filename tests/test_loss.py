"""The fused loss against F.cross_entropy: every chunking, every ignore pattern, loss and gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from examplegpt import GPT
from examplegpt.loss import IGNORE_INDEX, fused_linear_cross_entropy

from .conftest import examples, tiny_config

VOCAB, PADDED, WIDTH = 37, 64, 8


@settings(max_examples=examples(150), deadline=None)
@given(
    rows=st.integers(1, 24),
    chunk_rows=st.integers(1, 30),
    pattern=st.sampled_from(["none", "random", "first", "last", "all_but_one", "all"]),
    seed=st.integers(0, 2**16),
)
def test_fused_loss_and_gradients_equal_f_cross_entropy(rows, chunk_rows, pattern, seed):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(1, rows, WIDTH, generator=generator, requires_grad=True)  # (B, T, C)
    weight = torch.randn(PADDED, WIDTH, generator=generator, requires_grad=True)  # padded vocabulary rows
    targets = torch.randint(0, VOCAB, (1, rows), generator=generator)
    ignored = {
        "none": torch.zeros(rows, dtype=torch.bool),
        "random": torch.rand(rows, generator=generator) < 0.4,
        "first": torch.arange(rows) == 0,
        "last": torch.arange(rows) == rows - 1,
        "all_but_one": torch.arange(rows) != rows // 2,
        "all": torch.ones(rows, dtype=torch.bool),
    }[pattern]
    targets[0, ignored] = IGNORE_INDEX

    loss = fused_linear_cross_entropy(h, weight, targets, VOCAB, chunk_rows)
    loss.backward()
    grads = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    reference = F.cross_entropy((h @ weight.t())[..., :VOCAB].flatten(0, 1), targets.flatten())
    reference.backward()

    torch.testing.assert_close(loss, reference, equal_nan=True)  # all ignored: NaN, as PyTorch gives
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss-only path
        torch.testing.assert_close(
            fused_linear_cross_entropy(h, weight, targets, VOCAB, chunk_rows), reference, equal_nan=True
        )


def test_the_model_ignores_minus_100_and_refuses_other_negative_targets():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x = torch.randint(0, 50257, (2, 16))
    y = torch.randint(0, 50257, (2, 16))
    y[0, :5] = IGNORE_INDEX
    logits, _ = model(x)
    _, fused = model(x, y)
    reference = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    y[1, 3] = -1  # not the ignore value: an error, as in PyTorch
    with pytest.raises(IndexError):
        model(x, y)


def test_under_bfloat16_autocast_the_fused_loss_and_gradients_match_the_plain_ones():
    # the weight's gradient is made by bf16 products (tensor cores, AMX) added into float32, chunk by chunk
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(1, 96, WIDTH, generator=generator, requires_grad=True)  # (B, T, C)
    weight = torch.randn(PADDED, WIDTH, generator=generator, requires_grad=True)
    targets = torch.randint(0, VOCAB, (1, 96), generator=generator)
    with torch.autocast("cpu", torch.bfloat16):
        loss = fused_linear_cross_entropy(h, weight, targets, VOCAB, chunk_rows=16)
    loss.backward()
    grads = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    with torch.autocast("cpu", torch.bfloat16):
        logits = (h @ weight.t())[..., :VOCAB]  # (B, T, V) bf16
    reference = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    reference.backward()

    assert weight.grad.dtype == grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[0], h.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grads[1], weight.grad, rtol=2e-2, atol=2e-3)


def test_under_float16_autocast_a_chunk_s_weight_gradient_does_not_overflow():
    """An audit's case: every target one token and one hidden feature large, so that a chunk's sum for that
    token's row passes float16's 65,504 (the product summed in float16 gave -inf)."""
    generator = torch.Generator().manual_seed(0)
    rows, width = 4096, 32
    h = torch.randn(1, rows, width, generator=generator)
    h[..., 0] = 20.0  # (B, T, C): one feature of constant sign
    h.requires_grad_()
    weight = (torch.randn(PADDED, width, generator=generator) * 0.02).requires_grad_()
    targets = torch.full((1, rows), 5)
    with torch.autocast("cpu", torch.float16):
        loss = fused_linear_cross_entropy(h, weight, targets, VOCAB, chunk_rows=rows)
    loss.backward()
    assert torch.isfinite(weight.grad).all()
    # (softmax - onehot) summed over the rows, each times 20, over the mean's rows: about -20 for the target
    assert weight.grad[5, 0].item() == pytest.approx(-20.0, rel=0.05)
