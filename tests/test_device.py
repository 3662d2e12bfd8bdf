"""Choosing the device, the compute dtype and the micro-batch."""

import pytest
import torch

from examplegpt import GPT
from examplegpt.device import find_micro_batch

from .conftest import tiny_config


@pytest.mark.parametrize("per_rank, micro", [(64, 8), (12, 6), (7, 7), (9, 3), (1, 1)])
def test_on_cpu_the_micro_batch_is_the_largest_divisor_up_to_eight(per_rank, micro):
    model = GPT(tiny_config())
    assert find_micro_batch(model, per_rank, 16, torch.device("cpu"), torch.float32) == micro
