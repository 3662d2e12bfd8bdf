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
