"""Choosing the device, the compute dtype and the micro-batch."""

import pytest
import torch

from examplegpt import GPT
from examplegpt.device import find_micro_batch, prepare_for_inference
from examplegpt.errors import UserError

from .conftest import tiny_config


@pytest.mark.parametrize("per_rank, micro", [(64, 8), (12, 6), (7, 7), (9, 3), (1, 1)])
def test_on_cpu_the_micro_batch_is_the_largest_divisor_up_to_eight(per_rank, micro):
    model = GPT(tiny_config())
    assert find_micro_batch(model, per_rank, 16, torch.device("cpu"), torch.float32) == micro


@pytest.mark.parametrize(
    "name, dtype",
    [("bfloat16", torch.bfloat16), ("FP32", torch.float32), ("Float16", torch.float16), ("half", torch.float16)],
)
def test_prepare_for_inference_takes_torch_names_in_any_case(name, dtype):
    model = prepare_for_inference(GPT(tiny_config()), name, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {dtype}


@pytest.mark.parametrize("given", ["int4", "FP64", None])
def test_prepare_for_inference_refuses_an_unknown_precision_by_naming_the_choices(given):
    with pytest.raises(UserError, match=rf"precision must be auto, fp32, bf16, fp16 or int8, got {given!r}$"):
        prepare_for_inference(GPT(tiny_config()), given, torch.device("cpu"))


@pytest.mark.parametrize(
    "precision, flags, noted",
    [
        ("bf16", {"avx2", "fma"}, True),  # AVX2-only: bf16 and fp16 products are converted to float32
        ("fp16", {"avx2", "fma"}, True),
        ("bf16", {"avx512f", "amx_bf16"}, False),
        ("fp16", {"avx512f", "amx_bf16"}, True),  # AMX for bf16 is no help to fp16
        ("fp16", {"avx512f", "avx512_fp16"}, False),
        ("fp32", {"avx2"}, False),
        ("int8", {"avx2"}, False),
    ],
)
def test_a_half_precision_the_cpu_only_emulates_is_noted_on_stderr(monkeypatch, capsys, precision, flags, noted):
    monkeypatch.setattr("examplegpt.device.cpu_flags", lambda: flags)
    prepare_for_inference(GPT(tiny_config()), precision, torch.device("cpu"))
    err = capsys.readouterr().err
    assert ("note: this CPU has no native" in err) == noted
    if noted:
        assert f"each {precision} product to float32" in err and len(err.strip().splitlines()) == 1
