"""The CPU accelerator: nn.Linear's products on copies of the weights in faster layouts, fenced to inference runs that ask for it."""

import gc
import json
import math
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

from examplegpt import GPT, cpu_inference, generate, saved_layouts
from examplegpt.cpu_inference import (
    AUTOGRAD_REFUSED,
    LAYOUTS,
    PASSES_TO_DECIDE,
    PROBE_SAMPLES,
    TIMED_WEIGHTS,
    FastLinearForward,
    LinearGroup,
    can_pack,
    chosen,
    fast_cpu_inference,
    kv_cache_dtype,
    layouts_for,
    on_trial,
    packing_report,
    packing_summary,
)
from examplegpt.weights import save_model_file

from .conftest import fresh_process, peaked_model, tiny_config

pytestmark = pytest.mark.skipif(not can_pack(torch.ones(1)), reason="this PyTorch build has no oneDNN")


REAL_SPEEDUPS = LinearGroup.speedups
REAL_PLAIN_PASSES = cpu_inference.PLAIN_PASSES
REAL_COPY_COST = cpu_inference.COPY_COST
PACKING_PAYS = {"plain": 1.0, "packed": 2.0, "transposed": 1.0, "mkl_packed": 1.0}


@pytest.fixture(autouse=True)
def packing_pays_everywhere(monkeypatch):
    """The tests of what packing computes see it used at every size; the probe's own tests replace this."""
    monkeypatch.setattr(cpu_inference, "_speedups", {})  # a fresh process's decisions
    monkeypatch.setattr(cpu_inference, "_trials", {})
    monkeypatch.setattr(cpu_inference, "_saved", set())
    monkeypatch.setattr(cpu_inference, "_earlier", {})
    monkeypatch.setattr(cpu_inference, "_merged", set())
    monkeypatch.setattr(cpu_inference, "_used", set())
    monkeypatch.setattr(cpu_inference, "_met", set())
    monkeypatch.setattr(cpu_inference, "_unsaved", set())
    monkeypatch.setattr(cpu_inference, "_short", set())
    monkeypatch.setattr(cpu_inference, "PLAIN_PASSES", 0)  # every size from its first pass (a test below, not)
    monkeypatch.setattr(cpu_inference, "COPY_COST", dict.fromkeys(LAYOUTS, 0))  # copies at once (a test below, not)
    monkeypatch.setattr(
        LinearGroup,
        "speedups",
        lambda group, rows: cpu_inference._speedups.setdefault((*group.key, rows), PACKING_PAYS),
    )


def clock_of_costs(monkeypatch, packed_cost, plain_cost, transposed_cost=None, mkl_packed_cost=None) -> list[float]:
    """A CPU where a product of r rows takes packed_cost(r) seconds packed, plain_cost(r) plain and
    transposed_cost(r) transposed, mkl_packed_cost(r) in MKL's packed format (those two by default as plain):
    a clock, not a sleep. Returns [the clock's time]."""
    monkeypatch.setattr(LinearGroup, "speedups", REAL_SPEEDUPS)
    now = [0.0]
    costs = {
        "packed": packed_cost,
        "plain": plain_cost,
        "transposed": transposed_cost or plain_cost,
        "mkl_packed": mkl_packed_cost or plain_cost,
    }
    real = FastLinearForward.product

    def product(forward, layout, x):
        now[0] += costs[layout](x.numel() // x.shape[-1])
        return real(forward, layout, x)

    monkeypatch.setattr(FastLinearForward, "product", product)
    monkeypatch.setattr(cpu_inference, "_clock", lambda: now[0])
    return now


def run_the_trial(linear: torch.nn.Linear, x: torch.Tensor) -> FastLinearForward:
    """Multiply x by a lone Linear (a group of one weight: one timed product a call) until its trial at x's number
    of rows has decided; returns its forward."""
    for _ in range(len(LAYOUTS) * (PROBE_SAMPLES + 1)):
        linear(x)
    return vars(linear)["forward"]


def packed_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(vars(m).get("forward"), FastLinearForward)]


@pytest.fixture
def packed_calls(monkeypatch) -> list[int]:
    """Counts the products that run on packed weights."""
    calls = []
    real = cpu_inference._packed_forward

    def counting(weight, bias, x):
        calls.append(1)
        return real(weight, bias, x)

    monkeypatch.setattr(cpu_inference, "_packed_forward", counting)
    return calls


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(1,), (8,), (3, 5)])
def test_a_packed_linear_computes_what_nn_linear_does(dtype, tolerance, bias, rows):
    if not can_pack(torch.ones(1, dtype=dtype)):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU")
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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(1,), (8,), (3, 5)])
def test_every_layout_computes_what_nn_linear_does(layout, bias, rows):
    if layout not in layouts_for(torch.float32):
        pytest.skip(f"this PyTorch build has no {layout} product")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=bias)
    x = torch.randn(*rows, 96)
    with torch.inference_mode(), fast_cpu_inference(linear):
        y = vars(linear)["forward"].product(layout, x)
    assert y.shape == (*rows, 200)
    assert torch.allclose(y, F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)


needs_mkl_packing = pytest.mark.skipif(
    "mkl_packed" not in layouts_for(torch.float32), reason="this PyTorch build has no MKL packed product"
)


@needs_mkl_packing
@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(1, 300),
    in_features=st.integers(1, 300),
    rows=st.lists(st.integers(1, 200), min_size=1, max_size=4),
    bias=st.booleans(),
)
def test_one_mkl_packed_copy_serves_every_number_of_rows(out_features, in_features, rows, bias):
    """MKL packs a weight for a number of rows (`_mkl_reorder_linear_weight`'s hint), and its product is told the
    number it multiplies: one copy must give F.linear's result at any number, from the copy itself (the op falls
    back to the plain weight it is also given where the numbers differ: here that weight is zeros)."""
    torch.manual_seed(out_features * 1000 + in_features)
    weight = torch.randn(out_features, in_features)
    b = torch.randn(out_features) if bias else None
    packed = cpu_inference._mkl_pack(weight)
    for count in rows:
        x = torch.randn(count, in_features)
        y = cpu_inference._mkl_packed_forward(packed, torch.zeros_like(weight), b, x)
        expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
        assert y.dtype == torch.float32 and y.shape == (count, out_features)
        assert torch.allclose(y.double(), expected, atol=1e-5 * in_features**0.5, rtol=1e-5)


def test_weights_mkl_does_not_pack_are_tried_in_the_other_layouts_and_run_plain_where_it_is_forced(monkeypatch):
    if not can_pack(torch.ones(1, dtype=torch.bfloat16)):
        pytest.skip("oneDNN cannot pack bfloat16 on this CPU")
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.inference_mode(), fast_cpu_inference(linear, layout="mkl_packed"):
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))  # plain, no copy
        assert vars(linear)["forward"].copies == {}
    assert "mkl_packed" not in layouts_for(torch.bfloat16)
    cpu_inference._mkl_packs_right.cache_clear()
    monkeypatch.setattr(cpu_inference, "_mkl_packed_forward", lambda packed, weight, bias, x: torch.zeros(1))
    try:  # a PyTorch whose MKL ops compute otherwise (or that has none): float32 is tried in the other three
        assert layouts_for(torch.float32) == ("plain", "packed", "transposed")
    finally:
        cpu_inference._mkl_packs_right.cache_clear()  # the next test tries the real ops again


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("x_shape", [(3, 63), (4,), (8, 32)])
def test_an_input_of_the_wrong_width_is_refused_in_every_layout_as_nn_linear_refuses_it(layout, x_shape):
    """Found by an audit: MKL's packed product reads `in` numbers a row unchecked (garbage, or a segfault)."""
    linear = torch.nn.Linear(64, 96).requires_grad_(False)
    x = torch.randn(x_shape)
    with pytest.raises(RuntimeError) as plain_error:
        F.linear(x, linear.weight, linear.bias)
    with torch.inference_mode(), fast_cpu_inference(linear, layout=layout):
        with pytest.raises(RuntimeError) as error:
            linear(x)
    assert str(error.value) == str(plain_error.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_strided_bias_is_added_as_it_is_in_every_layout(layout):
    """Found by an audit: oneDNN's packed product read a strided bias as if it were contiguous."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).requires_grad_(False)
    linear.bias = torch.nn.Parameter(torch.randn(96, 2)[:, 0], requires_grad=False)  # every other number
    x = torch.randn(5, 64)
    with torch.inference_mode(), fast_cpu_inference(linear, layout=layout):
        y = linear(x)
    assert torch.allclose(y, F.linear(x, linear.weight, linear.bias), atol=1e-5)


def test_a_layout_forced_for_a_comparison_runs_at_every_size_and_an_unknown_one_is_refused(tiny_model, packed_calls):
    with torch.inference_mode(), fast_cpu_inference(tiny_model, layout="transposed"):
        tiny_model(torch.randint(0, 50257, (1, 8)))
        assert all(set(vars(m)["forward"].copies) == {"transposed"} for m in packed_linears(tiny_model))
    assert packed_calls == [] and cpu_inference._trials == {}
    with pytest.raises(ValueError, match="plain, packed, transposed, mkl_packed"):
        with fast_cpu_inference(tiny_model, layout="blocked"):
            pass


def test_a_weight_changed_within_the_run_is_packed_again():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    with torch.no_grad(), fast_cpu_inference(linear):
        linear(x)
        linear.weight.mul_(2)  # in place, as loading new weights would
        assert torch.allclose(linear(x), F.linear(x, linear.weight, linear.bias), atol=1e-5)
        linear.to(torch.bfloat16)  # replaced: new storage, new dtype
        y = linear(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert torch.allclose(y.float(), F.linear(x, linear.weight.float(), linear.bias.float()), atol=2e-2)
        linear.to(torch.float16)  # a dtype oneDNN is not given: the plain product
        assert torch.equal(linear(x.half()), F.linear(x.half(), linear.weight, linear.bias))


def test_weights_made_under_inference_mode_are_packed_afresh_by_each_run():
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


def test_the_copies_live_only_as_long_as_the_run(tiny_model):
    gc.disable()  # freed when the block ends, not when the collector comes round (an audit found them waiting)
    try:
        with torch.inference_mode(), fast_cpu_inference(tiny_model):
            linears = packed_linears(tiny_model)
            assert tiny_model.lm_head in linears and len(linears) == 1 + 4 * tiny_model.config.num_layers
            tiny_model(torch.randint(0, 50257, (1, 8)))
            copies = [weakref.ref(vars(m)["forward"].copies["packed"]) for m in linears]
        assert packed_linears(tiny_model) == [] and all(copy() is None for copy in copies)  # nothing kept them
    finally:
        gc.enable()


def test_a_weight_turned_to_another_dtype_within_the_run_runs_plain_and_is_not_timed_as_the_old_one(packed_calls):
    """Found by an audit: a group's key was fixed when the block opened, so bfloat16 products were timed, and
    reported, as the float32 group's."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).requires_grad_(False)
    x = torch.randn(4, 64)
    with torch.inference_mode(), fast_cpu_inference(linear):
        linear(x)
        assert len(packed_calls) == 1
        linear.to(torch.bfloat16)
        for _ in range(3):
            assert torch.equal(linear(x.bfloat16()), F.linear(x.bfloat16(), linear.weight, linear.bias))
    assert len(packed_calls) == 1
    assert {key[2] for key in cpu_inference._speedups} == {torch.float32}


def test_parametrized_linears_run_as_pytorch_runs_them():
    """Found by an audit: a parametrized weight is not in the module's parameters, and the block raised KeyError."""
    torch.manual_seed(0)
    double = type("Double", (torch.nn.Module,), {"forward": lambda self, w: 2 * w})
    before, during = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    parametrize.register_parametrization(before, "weight", double())
    x = torch.randn(3, 16)
    with torch.inference_mode(), fast_cpu_inference(before), fast_cpu_inference(during):
        assert packed_linears(before) == []  # not wrapped: its weight is computed at every call
        assert torch.equal(before(x), F.linear(x, before.weight, before.bias))
        during(x)
        parametrize.register_parametrization(during, "weight", double())  # within the block
        assert torch.equal(during(x), F.linear(x, during.weight, during.bias))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_products_under_autocast_are_autocast_s_own(layout):
    """Found by an audit: the packed product of a float32 copy and autocast's bfloat16 input raised."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).requires_grad_(False)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = linear(x)
        with torch.inference_mode(), fast_cpu_inference(linear, layout=layout):
            y = linear(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)


def test_nested_runs_keep_the_outer_one_packed_until_it_ends(tiny_model, packed_calls):
    idx = torch.randint(0, 50257, (1, 8))
    with torch.inference_mode(), fast_cpu_inference(tiny_model):
        outer = {m: vars(m)["forward"] for m in packed_linears(tiny_model)}
        with fast_cpu_inference(tiny_model), fast_cpu_inference(tiny_model.lm_head):
            assert {m: vars(m)["forward"] for m in packed_linears(tiny_model)} == outer  # nothing packed twice
        assert {m: vars(m)["forward"] for m in packed_linears(tiny_model)} == outer  # the inner exit left them
        tiny_model(idx)
        assert len(packed_calls) == len(outer)  # every product still on packed weights
    assert packed_linears(tiny_model) == []
    tiny_model(idx)
    assert len(packed_calls) == len(outer)  # after the outer exit: the plain products


def test_a_model_that_autograd_would_train_is_refused(tiny_model):
    with pytest.raises(RuntimeError, match="inference only"):
        with fast_cpu_inference(tiny_model):
            pass
    assert packed_linears(tiny_model) == []  # refused before touching the model
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad(), fast_cpu_inference(tiny_model):  # entered without grad, then grad switched on
        with torch.enable_grad(), pytest.raises(RuntimeError) as refused:
            tiny_model(idx)
    assert str(refused.value) == AUTOGRAD_REFUSED
    frozen = tiny_model.requires_grad_(False)
    x = torch.randn(2, tiny_model.config.d_model, requires_grad=True)
    with fast_cpu_inference(frozen):  # grad on, weights frozen: allowed, unless an input wants a gradient
        frozen(idx)
        with pytest.raises(RuntimeError, match="inference only"):
            frozen.lm_head(x)


def test_generation_is_the_same_with_and_without_packing(packed_calls):
    model = peaked_model(max_seq_len=64)
    prompt = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(1))
    plain = generate(model, prompt, 80, temperature=0)
    assert packed_calls == []  # the library function does not switch the accelerator on by itself
    with torch.inference_mode(), fast_cpu_inference(model):
        packed = generate(model, prompt, 80, temperature=0)
    assert packed_calls and torch.equal(packed, plain)


def test_bfloat16_logits_under_fast_cpu_inference_follow_the_plain_model():
    torch.manual_seed(0)
    model = GPT(tiny_config(max_seq_len=64)).eval().to(torch.bfloat16)
    idx = torch.randint(0, 50257, (2, 40))
    with torch.inference_mode():
        expected, _ = model(idx)
        with fast_cpu_inference(model):
            fast, _ = model(idx)
    assert torch.allclose(fast.float(), expected.float(), atol=3e-2, rtol=3e-2)


def test_a_bfloat16_model_on_cpu_decodes_over_a_float32_cache_as_it_would_recompute():
    model = peaked_model(max_seq_len=64).to(torch.bfloat16)
    assert kv_cache_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32
    prompt = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), fast_cpu_inference(model):
        out = generate(model, prompt, 40, temperature=0)
    with torch.inference_mode():  # the reference: the whole sequence again for every token, no cache
        for step in range(8, 48):
            logits, _ = model(out[:, :step])
            assert torch.equal(logits[:, -1].float().argmax(-1), out[:, step])


def test_a_pytorch_whose_onednn_ops_compute_otherwise_runs_unpacked(monkeypatch):
    cpu_inference._onednn_packs_right.cache_clear()
    monkeypatch.setattr(cpu_inference, "_packed_forward", lambda weight, bias, x: torch.zeros(*x.shape[:-1], 24))
    try:
        assert not can_pack(torch.ones(2, 2))
        linear = torch.nn.Linear(16, 24)
        x = torch.randn(3, 16)
        with torch.inference_mode(), fast_cpu_inference(linear):
            assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    finally:
        cpu_inference._onednn_packs_right.cache_clear()  # the next test tries the real ops again


@pytest.mark.parametrize("setting", ["autocast", "float64 by default"])
def test_the_ops_checked_first_under_another_setting_are_found_right_and_leave_the_seed_alone(setting):
    """Found by a test run in another order: a first check under torch.autocast compared bfloat16 products with
    float32 ones and took the ops for broken, for the rest of the process; an audit found the same under a float64
    default dtype, which MKL's packing refuses."""
    for check in (cpu_inference._onednn_packs_right, cpu_inference._mkl_packs_right):
        check.cache_clear()
    default = torch.get_default_dtype()
    try:
        torch.manual_seed(0)
        if setting == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert can_pack(torch.ones(1)) and layouts_for(torch.float32) == LAYOUTS
        else:
            torch.set_default_dtype(torch.float64)
            assert can_pack(torch.ones(1, dtype=torch.float32)) and layouts_for(torch.float32) == LAYOUTS
            torch.set_default_dtype(default)
        after_checks = torch.rand(3)
        torch.manual_seed(0)
        assert torch.equal(torch.rand(3), after_checks)  # the checks drew no numbers from the caller's generator
    finally:
        torch.set_default_dtype(default)
        for check in (cpu_inference._onednn_packs_right, cpu_inference._mkl_packs_right):
            check.cache_clear()


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_the_commands_apply_it_and_no_fast_cpu_turns_it_off(command, cli, tmp_path, corpus, packed_calls):
    model_file = tmp_path / "gpt_model.pt"
    save_model_file(peaked_model(max_seq_len=64), model_file)
    if command == "generate":
        args = ["generate", "-c", str(model_file), "-p", "Hello", "--max-tokens", "4", "-t", "0", "--ignore-eos"]
    else:
        args = ["evaluate", "-c", str(model_file), "--data", str(corpus), "--cache-dir", str(tmp_path / "c"), "--json"]
    fast = cli(*args, "--device", "cpu", "--verbose")
    assert fast.returncode == 0, fast.stderr
    assert packed_calls  # the command ran on packed weights
    assert "cpu_inference: 2 x Linear(64, 192, float32)" in fast.stderr and "-> packed" in fast.stderr  # --verbose
    packed_calls.clear()
    plain = cli(*args, "--device", "cpu", "--no-fast-cpu", "--verbose")
    assert plain.returncode == 0 and packed_calls == []
    assert "cpu_inference: off (--no-fast-cpu)" in plain.stderr
    if command == "generate":
        assert plain.stdout == fast.stdout  # greedy: the same tokens either way


def test_the_probe_keeps_the_plain_product_where_packing_is_slower(tiny_model, packed_calls, monkeypatch):
    clock_of_costs(monkeypatch, packed_cost=lambda rows: 2.0, plain_cost=lambda rows: 1.0)
    idx = torch.randint(0, 50257, (2, 8))
    with torch.inference_mode(), fast_cpu_inference(tiny_model):
        first = tiny_model(idx)[0]
        assert packed_calls  # on trial: some products packed
        assert rows_of(packing_summary()) == {"16": "0/5 (5 on trial)"}
        assert all("on trial" in line for line in packing_report())  # --verbose names the undecided too
        for _ in range(len(LAYOUTS) * (PROBE_SAMPLES + 1) - 1):  # the head, one product a pass, needs these to decide
            tiny_model(idx)
        packed_calls.clear()
        logits, _ = tiny_model(idx)
    assert packed_calls == []  # decided: every product plain
    assert torch.equal(logits, tiny_model(idx)[0])
    assert torch.allclose(first, logits, atol=1e-4)  # the trial's mix computes the same, up to rounding
    report = packing_report()
    assert report and all(line.endswith("-> plain") for line in report)
    assert rows_of(packing_summary()) == {"16": "0/5"}  # 2 x 8 rows through the blocks' 4 shapes and the head


def test_the_probe_takes_the_transposed_copy_where_it_is_fastest_and_frees_the_others(
    tiny_model, packed_calls, monkeypatch
):
    clock_of_costs(
        monkeypatch, packed_cost=lambda rows: 0.8, plain_cost=lambda rows: 1.0, transposed_cost=lambda rows: 0.5
    )
    head = tiny_model.lm_head
    x = torch.randn(1, head.in_features)
    with torch.inference_mode(), fast_cpu_inference(head):
        forward = run_the_trial(head, x)
        assert set(forward.copies) == {"transposed"}  # decided: the packed copy is freed
        packed_calls.clear()
        y = head(x)
        assert packed_calls == [] and torch.equal(y, forward.product("transposed", x))
        for _ in range(len(LAYOUTS)):  # a trial at another number of rows makes the copies it needs again
            head(torch.randn(2, head.in_features))
        assert set(forward.copies) == {"packed", "transposed", "mkl_packed"}
    where = f"1 x Linear({head.in_features}, {head.out_features}, float32)"
    assert packing_report() == [
        f"{where}, 1 rows: packed 1.25x, transposed 2.00x, mkl_packed 1.00x plain -> transposed",
        f"{where}, 2 rows: on trial (0 of 5 timings each so far)",
    ]


@needs_mkl_packing
def test_the_probe_takes_the_mkl_packed_copy_where_it_is_fastest_and_multiplies_by_it(tiny_model, monkeypatch):
    clock_of_costs(
        monkeypatch, packed_cost=lambda rows: 0.8, plain_cost=lambda rows: 1.0, mkl_packed_cost=lambda r: 0.4
    )
    calls = []
    real = cpu_inference._mkl_packed_forward
    monkeypatch.setattr(cpu_inference, "_mkl_packed_forward", lambda *args: calls.append(1) or real(*args))
    head = tiny_model.lm_head
    x = torch.randn(16, head.in_features)
    with torch.inference_mode(), fast_cpu_inference(head):
        forward = run_the_trial(head, x)
        assert set(forward.copies) == {"mkl_packed"}  # decided: the other copies are freed
        calls.clear()
        y = head(x)
    assert calls == [1] and torch.allclose(y, F.linear(x, head.weight), atol=1e-5)
    where = f"1 x Linear({head.in_features}, {head.out_features}, float32)"
    assert packing_report() == [
        f"{where}, 16 rows: packed 1.25x, transposed 1.00x, mkl_packed 2.50x plain -> mkl_packed"
    ]


def test_the_probe_decides_per_number_of_rows_once_per_process(tiny_model, packed_calls, monkeypatch):
    # packing pays from 2 rows on
    clock_of_costs(monkeypatch, packed_cost=lambda rows: 1.0 if rows == 1 else 0.5, plain_cost=lambda rows: 0.9)
    cache_len = tiny_model.config.max_seq_len
    layers = tiny_model.config.num_layers
    with torch.inference_mode():
        with fast_cpu_inference(tiny_model):
            for batch in (1, 3):
                # each pass times `layers` products of each of the 4 shapes
                for _ in range(math.ceil(len(LAYOUTS) * (PROBE_SAMPLES + 1) / layers)):
                    tiny_model.hidden_states(
                        torch.zeros(batch, 1, dtype=torch.long), cpu_inference_cache(tiny_model, batch, cache_len)
                    )
        assert rows_of(packing_summary()) == {"1": "0/4", "4": "4/4"}
        trials = dict(cpu_inference._trials)
        with fast_cpu_inference(tiny_model):  # a new block: the decisions stand, no trial runs again
            for batch in (1, 3):
                packed_calls.clear()
                cache = cpu_inference_cache(tiny_model, batch, cache_len)
                tiny_model.hidden_states(torch.zeros(batch, 1, dtype=torch.long), cache)
                assert len(packed_calls) == (0 if batch == 1 else 4 * layers)
    assert {key: t.calls for key, t in cpu_inference._trials.items()} == {key: t.calls for key, t in trials.items()}


def test_the_real_probe_measures_a_speedup(tiny_model, monkeypatch):
    monkeypatch.setattr(LinearGroup, "speedups", REAL_SPEEDUPS)
    with torch.inference_mode(), fast_cpu_inference(tiny_model):
        for _ in range(cpu_inference.PASSES_TO_DECIDE):  # (retries too: the tiny model's packed ratio is near 0.2)
            tiny_model(torch.randint(0, 50257, (1, 4)))
    speedups = cpu_inference._speedups
    assert len(speedups) == 5  # 4 rows through 5 weight shapes
    assert all(set(s) == set(LAYOUTS) and s["plain"] == 1 and min(s.values()) > 0 for s in speedups.values())


def test_a_trial_that_timed_a_stall_starts_again(tiny_model, monkeypatch):
    stalls = [PROBE_SAMPLES + 1]  # the first packed products of the trial each hit a stall of the machine

    def packed_cost(rows):
        stalls[0] -= 1
        return 100.0 if stalls[0] >= 0 else 0.5

    clock_of_costs(monkeypatch, packed_cost=packed_cost, plain_cost=lambda rows: 1.0)
    head = tiny_model.lm_head
    with torch.inference_mode(), fast_cpu_inference(head):  # one weight: one product a pass
        for _ in range(2 * len(LAYOUTS) * (PROBE_SAMPLES + 1)):
            head(torch.zeros(1, head.in_features))
    ((key, speedups),) = cpu_inference._speedups.items()
    assert speedups["packed"] == 2.0 and cpu_inference._trials[key].retries == 1


def test_the_engine_warm_up_settles_the_trials_of_every_decoding_size(tiny_model, monkeypatch):
    from examplegpt.batching import BatchEngine

    monkeypatch.setattr(LinearGroup, "speedups", REAL_SPEEDUPS)
    monkeypatch.setattr(cpu_inference, "PLAIN_PASSES", REAL_PLAIN_PASSES)  # as the commands run
    with torch.inference_mode(), fast_cpu_inference(tiny_model):
        BatchEngine(tiny_model.requires_grad_(False), max_batch=4).warm_up()
        summary = rows_of(packing_summary())
    # a trial times the most rows of those it stands for: 3-4 rows' at 4, 128+'s at the whole prompt
    timed = {key[-1]: trial.rows for key, trial in cpu_inference._trials.items()}
    assert timed[1] == 1 and timed[2] == 2 and timed[4] == 4
    assert timed[cpu_inference.PROBE_ROWS] == min(cpu_inference.PROBE_ROWS, tiny_model.config.max_seq_len - 1)
    decoding = [summary[rows] for rows in ("1", "2", "4")]
    assert all("on trial" not in choices for choices in decoding)
    assert all(choices.endswith("/5") for choices in decoding)  # the blocks' 4 shapes and the head
    # and the prompts' sizes (an audit found 32 and 64 rows still on trial, left to the first requests)
    prompts = [summary[rows] for rows in ("8", "16", "32", "64", "128+")]
    assert all("on trial" not in choices and choices.endswith("/4") for choices in prompts)  # the blocks' shapes


def test_a_trial_times_every_weight_in_every_layout_and_never_the_making_of_a_copy(monkeypatch):
    """Found by an audit: with as many weights in a group as layouts, each weight met one layout only, and
    the copies, made in the first products, were timed with them (a dozen weights: every trial chose plain)."""
    model = GPT(tiny_config(num_layers=3)).eval().requires_grad_(False)  # groups of 3 weights: one per layout
    now = clock_of_costs(monkeypatch, packed_cost=lambda rows: 0.5, plain_cost=lambda rows: 1.0)
    real_pack = cpu_inference._pack

    def slow_pack(weight):  # making a copy takes far longer than a product
        now[0] += 100.0
        return real_pack(weight)

    monkeypatch.setattr(cpu_inference, "_pack", slow_pack)
    met = set()
    counted = FastLinearForward.product
    monkeypatch.setattr(
        FastLinearForward, "product", lambda f, layout, x: met.add((id(f), layout)) or counted(f, layout, x)
    )
    with torch.inference_mode(), fast_cpu_inference(model):
        for _ in range(len(LAYOUTS) * (PROBE_SAMPLES + 1)):
            model.hidden_states(torch.zeros(1, 1, dtype=torch.long), cpu_inference_cache(model, 1, 8))
        forwards = [vars(m)["forward"] for m in packed_linears(model) if m is not model.lm_head]
    assert {(id(f), layout) for f in forwards for layout in LAYOUTS} <= met
    block_groups = {key: s for key, s in cpu_inference._speedups.items() if key[-2] == 3}
    assert len(block_groups) == 4 and all(s["packed"] == 2.0 for s in block_groups.values())


def test_a_trial_never_times_the_kernel_a_new_number_of_rows_builds(monkeypatch):
    """Found in the serving engine's warm-up: a trial at 16 rows meets 9, 10, ... 16 rows in turn, and oneDNN
    builds a packed kernel for each new shape; timed, those builds made packing look 3-5x slower than plain."""
    model = GPT(tiny_config(num_layers=3)).eval().requires_grad_(False)
    now = clock_of_costs(monkeypatch, packed_cost=lambda rows: 0.5, plain_cost=lambda rows: 1.0)
    built = set()
    timed = FastLinearForward.product

    def product(forward, layout, x):
        shape = (tuple(forward.linear.weight.shape), x.numel() // x.shape[-1])
        if layout == "packed" and shape not in built:  # the kernel for this shape is built on its first call
            built.add(shape)
            now[0] += 1.5  # (a plausible product time: no retry)
        return timed(forward, layout, x)

    monkeypatch.setattr(FastLinearForward, "product", product)
    with torch.inference_mode(), fast_cpu_inference(model, long_run=True):
        for _ in range(len(LAYOUTS) * (cpu_inference.LONG_RUN_SAMPLES + 1) // 3 + 1):  # 3 timed weights a pass
            for rows in range(9, 17):
                model.hidden_states(torch.zeros(rows, 1, dtype=torch.long), cpu_inference_cache(model, rows, 8))
    block_groups = {key: s for key, s in cpu_inference._speedups.items() if key[-2] == 3}
    assert len(block_groups) == 4 and all(key[-1] == 16 and s["packed"] == 2.0 for key, s in block_groups.items())
    assert {cpu_inference._trials[key].rows for key in block_groups} == {9}  # timed at the first number it met


@pytest.mark.parametrize("long_run", [False, True])
def test_a_long_run_s_trial_times_more_products_of_each_layout(tiny_model, monkeypatch, long_run):
    """A server settles its trials once, in its warm-up: five timings each ranked layouts wrongly too often."""
    clock_of_costs(monkeypatch, packed_cost=lambda rows: 0.5, plain_cost=lambda rows: 1.0)
    samples = cpu_inference.LONG_RUN_SAMPLES if long_run else PROBE_SAMPLES
    with torch.inference_mode(), fast_cpu_inference(tiny_model.requires_grad_(False), long_run=long_run):
        head = (*cpu_inference.linear_kind(tiny_model.lm_head), 1, 1)
        passes = 0
        while head not in cpu_inference._speedups:  # the head: one product a pass
            tiny_model.hidden_states(torch.zeros(1, 1, dtype=torch.long), cpu_inference_cache(tiny_model, 1, 1))
            tiny_model.logits(torch.zeros(1, tiny_model.config.d_model))
            passes += 1
    assert passes == len(LAYOUTS) * (samples + 1)
    assert all(len(seconds) == samples for seconds in cpu_inference._trials[head].seconds[1].values())


def test_a_trial_decides_at_the_number_of_rows_that_keeps_coming(tiny_model, monkeypatch):
    """Found by audits: a trial tied to the first number of rows it met (3), in an engine whose batches then stayed
    at 4, stayed on trial for good and kept its copies; one that started again after a while at another number
    never decided where batch sizes wandered."""
    clock_of_costs(monkeypatch, packed_cost=lambda rows: 0.5, plain_cost=lambda rows: 1.0)
    model = tiny_model.requires_grad_(False)
    head = (*cpu_inference.linear_kind(model.lm_head), 1, 4)
    with torch.inference_mode(), fast_cpu_inference(model):
        for _ in range(4):
            model.logits(torch.zeros(3, model.config.d_model))
        assert head not in cpu_inference._speedups
        passes = 0
        while head not in cpu_inference._speedups and passes < 1000:
            model.logits(torch.zeros(4, model.config.d_model))
            passes += 1
    assert cpu_inference._trials[head].rows == 4 and cpu_inference._speedups[head]["packed"] == 2.0
    assert passes == len(LAYOUTS) * (PROBE_SAMPLES + 1)  # 4 rows' own timings, from its first product


def test_a_trial_decides_where_batch_sizes_wander_within_its_range(tiny_model, monkeypatch):
    """An audit's engine: a dozen steps at 16 rows, then five dozen spread over 9-15, over and over."""
    clock_of_costs(monkeypatch, packed_cost=lambda rows: 0.5, plain_cost=lambda rows: 1.0)
    model = tiny_model.requires_grad_(False)
    head = (*cpu_inference.linear_kind(model.lm_head), 1, 16)
    with torch.inference_mode(), fast_cpu_inference(model, long_run=True):
        for _ in range(6):
            for rows in [16] * 12 + [9 + step % 7 for step in range(60)]:
                model.logits(torch.zeros(rows, model.config.d_model))
    assert cpu_inference._speedups[head]["packed"] == 2.0 and cpu_inference._trials[head].rows == 16


def test_the_engine_warm_up_settles_a_trial_begun_at_a_size_it_does_not_run(tiny_model, monkeypatch):
    """Found by an audit: a trial begun before the warm-up at a size the warm-up does not run (a 20-token prompt,
    in the 17-32 rows' trial) stayed on trial through it."""
    from examplegpt.batching import BatchEngine

    monkeypatch.setattr(LinearGroup, "speedups", REAL_SPEEDUPS)
    model = tiny_model.requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(model, long_run=True):
        model.hidden_states(torch.zeros(1, 20, dtype=torch.long))  # the blocks' trials at 17-32 rows begin at 20
        assert {rows for key, trial in cpu_inference._trials.items() if key[-1] == 32 for rows in trial.calls} == {20}
        BatchEngine(model, max_batch=4).warm_up()
        summary = packing_summary()
    assert "on trial" not in summary
    assert {trial.rows for key, trial in cpu_inference._trials.items() if key[-1] == 32} == {32}


def test_a_weight_replaced_within_the_run_is_never_taken_for_the_old_one():
    """Found by an audit: `.to(bfloat16).to(float32)` could land the new weight at the old one's address, and
    the old weight's copy was used."""
    for seed in range(5):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(256, 256).requires_grad_(False)
        x = torch.randn(4, 256)
        for layout in ("packed", "transposed"):
            with torch.no_grad(), fast_cpu_inference(linear, layout=layout):
                linear(x)
                linear.to(torch.bfloat16).to(torch.float32)  # rounded: a different weight
                assert torch.allclose(linear(x), F.linear(x, linear.weight, linear.bias), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_weights_and_empty_inputs_are_taken_as_nn_linear_takes_them(monkeypatch):
    monkeypatch.setattr(LinearGroup, "speedups", REAL_SPEEDUPS)
    for d_in, d_out, rows in ((0, 4, 3), (16, 0, 3), (16, 24, 0)):
        linear = torch.nn.Linear(d_in, d_out).requires_grad_(False)
        x = torch.randn(rows, d_in)
        with torch.no_grad(), fast_cpu_inference(linear):
            for _ in range(len(LAYOUTS) * (PROBE_SAMPLES + 1)):
                y = linear(x)
        assert torch.equal(y, F.linear(x, linear.weight, linear.bias))
    assert cpu_inference._speedups == {}  # nothing was timed: no product had anything to multiply


@pytest.mark.parametrize("speedup", [2.0, 1.0])  # at the first product, whether its layout is a copy or plain
def test_a_bias_that_wants_a_gradient_is_refused(monkeypatch, speedup):
    pays = {"plain": 1.0, "packed": speedup, "transposed": 1.0, "mkl_packed": 1.0}
    monkeypatch.setattr(
        LinearGroup, "speedups", lambda group, rows: cpu_inference._speedups.setdefault((*group.key, rows), pays)
    )
    linear = torch.nn.Linear(8, 4).requires_grad_(False)
    with fast_cpu_inference(linear):
        linear.bias.requires_grad_(True)  # after the block's check: caught at the product
        with pytest.raises(RuntimeError, match="inference only"):
            linear(torch.randn(2, 8))


def test_products_under_autocast_neither_count_nor_decide(tiny_model):
    """Found by an audit: 200 passes under autocast decided a layout, and --verbose called it used."""
    with torch.inference_mode(), fast_cpu_inference(tiny_model), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(5):
            tiny_model(torch.zeros(1, 4, dtype=torch.long))
    assert cpu_inference._met == set() and cpu_inference._speedups == {}
    assert packing_report() == [f"{cpu_inference.NONE_TRIED}: {cpu_inference.NONE_TRIED_BECAUSE}"]


def test_the_reports_name_only_the_numbers_of_rows_the_run_met(tmp_path, monkeypatch):
    """Found by an audit: `evaluate --verbose` listed the decisions saved by earlier `generate` runs, at numbers of
    rows it never ran, as "not used"."""
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(tmp_path / "layouts.json"))
    monkeypatch.setattr(LinearGroup, "speedups", REAL_SPEEDUPS)
    for rows in (1, 8, 1, 8):  # two trials each
        saved_layouts.save(
            (512, 64, torch.float32, False, 1, rows),
            {"plain": 1.0, "packed": 2.0, "transposed": 1.0, "mkl_packed": 1.0},
        )
    head = torch.nn.Linear(64, 512, bias=False).requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(head):
        head(torch.randn(1, 64))
    assert [line.split(": ")[0] for line in packing_report()[:-1]] == ["1 x Linear(64, 512, float32), 1 rows"]
    assert packing_summary().startswith("weight shapes in faster layouts at rows 1: 1/1 (1 decided by earlier")


def test_saved_speedups_out_of_the_plausible_range_are_not_taken(tmp_path, monkeypatch):
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(tmp_path / "layouts.json"))
    monkeypatch.setattr(LinearGroup, "speedups", REAL_SPEEDUPS)
    key = (512, 64, torch.float32, False, 1, 1)
    for _ in range(2):
        saved_layouts.save(
            key, {"plain": 1.0, "packed": 1e308, "transposed": 1.0, "mkl_packed": 1.0}
        )  # a hand-edited file, say
    head = torch.nn.Linear(64, 512, bias=False).requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(head):
        head(torch.randn(1, 64))
    assert cpu_inference._speedups == {} and cpu_inference._saved == set()


def test_a_trial_shared_by_two_open_blocks_frees_the_unused_copies_of_both(monkeypatch):
    """Found by an audit: two models of one shape share their trials, and only the block whose product ended
    a trial freed the copies it had not chosen."""
    clock_of_costs(
        monkeypatch, packed_cost=lambda rows: 0.8, plain_cost=lambda rows: 1.0, transposed_cost=lambda rows: 0.5
    )
    heads = [torch.nn.Linear(32, 96).requires_grad_(False) for _ in range(2)]
    x = torch.randn(1, 32)
    with torch.no_grad(), fast_cpu_inference(heads[0]), fast_cpu_inference(heads[1]):
        for _ in range(len(LAYOUTS) * (PROBE_SAMPLES + 1)):
            for head in heads:
                head(x)
        assert [set(vars(head)["forward"].copies) for head in heads] == [{"transposed"}, {"transposed"}]


def test_a_trial_copies_only_the_weights_it_times(monkeypatch):
    """A fresh command paid more for copying every weight into every layout than the trial's products cost."""
    model = GPT(tiny_config(num_layers=6)).eval().requires_grad_(False)  # groups of 6 weights
    clock_of_costs(
        monkeypatch, packed_cost=lambda rows: 0.8, plain_cost=lambda rows: 1.0, transposed_cost=lambda rows: 0.5
    )
    packed = []
    real_pack = cpu_inference._pack
    monkeypatch.setattr(cpu_inference, "_pack", lambda weight: packed.append(weight) or real_pack(weight))
    idx = torch.randint(0, 50257, (1, 1))
    with torch.inference_mode(), fast_cpu_inference(model):
        cache = cpu_inference_cache(model, 1, PASSES_TO_DECIDE + 1)
        while on_trial(1) or not cpu_inference._speedups:
            model.logits(model.hidden_states(idx, cache)[:, -1])
        assert len(packed) == 4 * TIMED_WEIGHTS + 1  # the blocks' four groups' first weights, and the head
        model.logits(model.hidden_states(idx, cache)[:, -1])  # a pass as chosen
        assert all(set(vars(m)["forward"].copies) == {"transposed"} for m in packed_linears(model))


def test_the_engine_warm_up_makes_each_copy_once(tiny_model, monkeypatch):
    """Every decoding size's trials run side by side, so none frees a copy that the next size would make again."""
    from examplegpt.batching import BatchEngine

    clock_of_costs(
        monkeypatch, packed_cost=lambda rows: 0.8, plain_cost=lambda rows: 1.0, transposed_cost=lambda rows: 0.5
    )
    made = []
    real_pack = cpu_inference._pack
    monkeypatch.setattr(cpu_inference, "_pack", lambda weight: made.append(weight) or real_pack(weight))
    monkeypatch.setattr(cpu_inference, "PLAIN_PASSES", REAL_PLAIN_PASSES)  # as the commands run
    with torch.inference_mode(), fast_cpu_inference(tiny_model):
        BatchEngine(tiny_model.requires_grad_(False), max_batch=4, prefill_chunk=2).warm_up()
        assert rows_of(packing_summary()) == {"1": "5/5", "2": "5/5", "4": "5/5", "128+": "4/4"}
        linears = packed_linears(tiny_model)
        assert all(set(vars(m)["forward"].copies) == {"transposed"} for m in linears)
    assert len(made) == len(linears)  # each weight packed once, for its trials


def cpu_inference_cache(model, batch, length):
    from examplegpt.kv_cache import KVCache

    return KVCache.allocate(model.config, batch, max_len=length)


def rows_of(summary: str) -> dict[str, str]:
    return dict(part.split(": ") for part in summary.split("rows ", 1)[1].split(", "))


def test_a_later_process_starts_from_the_decisions_two_earlier_ones_saved(tmp_path, monkeypatch):
    """A trial's copies cost a short command more than the faster layout saved (an audit: a fresh `generate`
    of 48 tokens on GPT-2 124M at 0.81x --no-fast-cpu); a later process on the machine runs no trial once two
    processes' trials agree."""
    saved = tmp_path / "layouts.json"
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(saved))
    clock_of_costs(
        monkeypatch, packed_cost=lambda rows: 0.8, plain_cost=lambda rows: 1.0, transposed_cost=lambda rows: 0.5
    )
    head = torch.nn.Linear(64, 512, bias=False).requires_grad_(False)
    x = torch.randn(1, 64)
    for trials in (1, 2):
        fresh_process(monkeypatch)
        with torch.inference_mode(), fast_cpu_inference(head):
            while not cpu_inference._speedups:
                head(x)
        decided = dict(cpu_inference._speedups)
        ((machine, records),) = json.loads(saved.read_text()).items()
        record = records.pop("512 64 float32 False 1 1")
        assert machine == saved_layouts.machine() and records == {}
        assert (record["speedups"], record["trials"]) == (decided[(512, 64, torch.float32, False, 1, 1)], trials)
    fresh_process(monkeypatch)
    packed = []
    monkeypatch.setattr(cpu_inference, "_pack", lambda weight: packed.append(weight))
    with torch.inference_mode(), fast_cpu_inference(head):
        assert torch.allclose(head(x), x @ head.weight.T, atol=1e-5)
        assert set(vars(head)["forward"].copies) == {"transposed"}
    assert packed == [] and cpu_inference._trials == {} and cpu_inference._speedups == decided
    report = packing_report()
    assert report[0].endswith("-> transposed (earlier runs' trials)") and str(saved) in report[-1]


@needs_mkl_packing
def test_decisions_saved_before_a_layout_came_are_tried_again(tmp_path, monkeypatch):
    """A file written when float32 weights were tried in three layouts: its decisions did not weigh MKL's packed
    product, so they stand for nothing."""
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(tmp_path / "layouts.json"))
    monkeypatch.setattr(LinearGroup, "speedups", REAL_SPEEDUPS)
    key = (512, 64, torch.float32, False, 1, 1)
    for _ in range(2):  # two trials: enough to stand without a third
        saved_layouts.save(key, {"plain": 1.0, "packed": 2.0, "transposed": 1.0})
    head = torch.nn.Linear(64, 512, bias=False).requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(head):
        assert cpu_inference._speedups == {} and cpu_inference._earlier == {}
        while not cpu_inference._speedups:
            head(torch.randn(1, 64))
    assert set(cpu_inference._speedups[key]) == set(layouts_for(torch.float32))


def test_a_copy_one_trial_overrated_is_not_kept_when_the_next_trial_disagrees(tmp_path, monkeypatch):
    """One trial at a busy moment on the Xeon VM chose layouts that left GPT-2 124M at 0.95x plain at batch 1,
    for every later command."""
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(tmp_path / "layouts.json"))
    key = (512, 64, torch.float32, False, 1, 1)
    saved_layouts.save(
        key, {"plain": 1.0, "packed": 2.0, "transposed": 1.0, "mkl_packed": 1.0}
    )  # the busy moment's trial
    clock_of_costs(monkeypatch, packed_cost=lambda rows: 2.0, plain_cost=lambda rows: 1.0)  # the truth: 0.5x
    head = torch.nn.Linear(64, 512, bias=False).requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(head):
        assert cpu_inference._speedups == {}  # one trial saved: this process tries too
        while not cpu_inference._speedups:
            head(torch.randn(1, 64))
    assert chosen(cpu_inference._speedups[key]) == "plain"
    assert packing_report()[0].endswith("-> plain (this run's and an earlier run's trials)")
    ((speedups, trials),) = saved_layouts.load().values()
    assert trials == 2 and speedups == pytest.approx(
        {"plain": 1.0, "packed": 1.0, "transposed": 1.0, "mkl_packed": 1.0}
    )


def test_trials_are_combined_by_their_geometric_mean_so_that_a_gain_and_a_loss_weigh_alike():
    assert saved_layouts.combined({"packed": 1.0}, 1, {"packed": 4.0}) == pytest.approx({"packed": 2.0})
    assert saved_layouts.combined({"packed": 8.0}, 2, {"packed": 1.0}) == pytest.approx({"packed": 4.0})
    assert saved_layouts.merged({"speedups": {"packed": "x"}, "trials": 1}, {"packed": 3.0}) == {
        "speedups": {"packed": 3.0},
        "trials": 1,
        "spans": [],
    }  # a record that does not parse counts for nothing


def test_trials_that_ran_at_the_same_time_count_as_one(tmp_path, monkeypatch):
    """Found by an audit: two commands started at once on a machine with no file each timed the other's
    load, and both trials were kept."""
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(tmp_path / "layouts.json"))
    key, speedups = (
        (512, 64, torch.float32, False, 1, 1),
        {"plain": 1.0, "packed": 2.0, "transposed": 1.0, "mkl_packed": 1.0},
    )
    counts = []
    for span in ((100.0, 110.0), (105.0, 112.0), (120.0, 130.0)):  # the first two overlap
        saved_layouts.save(key, speedups, span)
        counts.append(saved_layouts.load()[key][1])
    assert counts == [1, 1, 2]


KEY_TEXT = "512 64 float32 False 1 1"
HUGE = "9" * 400  # an integer too large for a float


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[1, 2]",
        '{"MACHINE": {"1 2 float32 True 1 1": {"plain": "x"}}}',
        # found by an audit: a count or a speed-up too large for Python's int or float raised OverflowError
        '{"MACHINE": {"' + KEY_TEXT + '": {"speedups": {"plain": 1, "packed": 2}, "trials": Infinity}}}',
        '{"MACHINE": {"' + KEY_TEXT + '": {"speedups": {"plain": 1, "packed": 2}, "trials": 1e400}}}',
        '{"MACHINE": {"' + KEY_TEXT + '": {"speedups": {"plain": 1, "packed": ' + HUGE + '}, "trials": 2}}}',
    ],
)
def test_a_file_of_decisions_that_is_not_ours_is_read_as_empty_and_written_anew(content, tmp_path, monkeypatch):
    saved = tmp_path / "layouts.json"
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(saved))
    saved.write_text(content.replace("MACHINE", saved_layouts.machine()))
    assert saved_layouts.load() == {}
    key = (512, 64, torch.float32, False, 1, 1)
    saved_layouts.save(key, {"plain": 1.0, "packed": 0.9, "transposed": 1.2, "mkl_packed": 1.0})
    assert saved_layouts.load() == {key: ({"plain": 1.0, "packed": 0.9, "transposed": 1.2, "mkl_packed": 1.0}, 1)}


def test_another_machine_s_decisions_are_not_used(tmp_path, monkeypatch):
    saved = tmp_path / "layouts.json"
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(saved))
    key = (512, 64, torch.float32, False, 1, 1)
    saved_layouts.save(key, {"plain": 1.0, "packed": 2.0, "transposed": 1.0, "mkl_packed": 1.0})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # the same CPU with other threads is another machine
    assert saved_layouts.load() == {}
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", "")  # none kept
    assert saved_layouts.path() is None and saved_layouts.load() == {}


def test_the_generate_command_saves_its_trials_for_the_next_one(tmp_path):
    from .conftest import run_cli

    torch.manual_seed(0)
    save_model_file(GPT(tiny_config()), tmp_path / "m.pt")
    saved = tmp_path / "cache" / "layouts.json"
    runs = []
    for _ in range(3):  # runs long enough to repay their trials (a short one runs none: a test below)
        args = ["generate", "-c", str(tmp_path / "m.pt"), "-p", "Hello", "-n", "1800", "-t", "0", "--verbose"]
        with pytest.MonkeyPatch.context() as env:
            env.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(saved))
            runs.append(run_cli(*args))
    assert [proc.returncode for proc in runs] == [0, 0, 0], runs[0].stderr

    merged, kept = " (this run's and an earlier run's trials)", " (earlier runs' trials)"

    def decisions(stderr: str) -> dict[str, str]:  # decision -> where it came from (a copy's use is the run's own)
        lines = [line.split("; not used")[0] for line in stderr.splitlines() if " -> " in line]
        sources = [next(m for m in (merged, kept, "") if line.endswith(m)) for line in lines]
        return {line.removesuffix(source): source for line, source in zip(lines, sources)}

    first, second, third = (decisions(proc.stderr) for proc in runs)
    assert first and set(first.values()) == {""}, runs[0].stderr
    # the second runs its trials again (one trial may have timed a busy moment), the third none of those
    again = {line for line, source in second.items() if source == merged}
    assert again and all(third.get(line) == kept for line in again), (runs[1].stderr, runs[2].stderr)


def first_trial_pass(model, cache, passes: int) -> int | None:
    """Decode up to `passes` one-row steps: the first (1-based) at which some trial is running, or None."""
    for step in range(1, passes + 1):
        model.logits(model.hidden_states(torch.randint(0, 50257, (1, 1)), cache)[:, -1])
        if cpu_inference.on_trial(1):
            return step
    return None


@pytest.mark.parametrize("passes", [None, 400, 50])
def test_a_trial_waits_until_the_run_would_have_repaid_it_and_never_starts_where_the_run_ends_first(
    tiny_model, monkeypatch, passes
):
    """A fresh machine's `generate` of 48 tokens ran 0.80x --no-fast-cpu (GPT-2 124M) and 0.65x (6 x 384): a trial
    at a size's third pass made copies that its few passes left could not earn back."""
    clock_of_costs(monkeypatch, packed_cost=lambda rows: 0.5, plain_cost=lambda rows: 1.0)  # a trial would pack
    with_real_waits(monkeypatch)
    # 1 a weight: a short wait
    monkeypatch.setattr(cpu_inference, "COPY_COST", dict.fromkeys(("packed", "transposed", "mkl_packed"), 1 / 3))
    # each group times all its weights (2 layers, or the LM head), each copied in every layout: 1 one-row product
    # a weight, repaid by as many products FASTER_MARGIN faster as below, one a pass for each weight
    repaying = 1 / (1 - 1 / cpu_inference.FASTER_MARGIN)
    trial_passes = (cpu_inference.PROBE_SAMPLES + 1) * len(LAYOUTS)
    model = tiny_model.requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(model, passes=passes):
        cache = cpu_inference_cache(model, 1, model.config.max_seq_len)
        started = first_trial_pass(model, cache, 100)
        report = packing_report()
    if passes is not None and passes < 2 * repaying + trial_passes:  # the run ends before the bet is repaid
        assert started is None and cpu_inference._trials == {}
        assert all(vars(m)["forward"].copies == {} for m in packed_linears(model))
        assert report and all(
            line.endswith("not tried (the run was too short to repay a trial) -> plain") for line in report
        )
    else:
        assert started == math.floor(repaying) + 1


@pytest.mark.parametrize("passes", [None, 200, 25])
def test_a_decided_layout_s_copies_wait_for_the_run_to_repay_them_and_never_come_where_it_ends_first(
    tiny_model, monkeypatch, packed_calls, passes
):
    with_real_waits(monkeypatch, speedup=2.0)
    model = tiny_model.requires_grad_(False)
    wait = REAL_COPY_COST["packed"] / 0.5  # one-row products a weight: each saves half a product
    with torch.inference_mode(), fast_cpu_inference(model, passes=passes):
        wrapped = len(packed_linears(model))
        cache = cpu_inference_cache(model, 1, model.config.max_seq_len)
        counts = packed_per_pass(model, cache, 1, 30, packed_calls)
    if passes is not None and passes < 2 * wait:
        assert counts == [0] * 30
    else:
        assert counts == [0] * int(wait) + [wrapped] * (30 - int(wait))


@pytest.mark.parametrize("passes", ["10", 2.5, -1, True, float("nan"), torch.tensor(2.0)])
def test_passes_must_be_a_whole_number_or_none(tiny_model, passes):
    with (
        pytest.raises(ValueError, match=r"passes \(None where it is not known\) must be a whole number"),
        fast_cpu_inference(tiny_model, passes=passes),
    ):
        pass


@pytest.mark.parametrize("passes", [np.int64(10), torch.tensor(10), 0])
def test_passes_may_be_any_whole_number(tiny_model, passes):
    with fast_cpu_inference(tiny_model.requires_grad_(False), passes=passes):
        assert all(vars(m)["forward"].group.passes == int(passes) for m in packed_linears(tiny_model))


def test_a_huge_number_of_passes_is_taken(tiny_model):
    model = tiny_model.requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(model, passes=10**400):
        assert generate(model, torch.zeros(1, 1, dtype=torch.long), 5, temperature=0).shape == (1, 6)


def test_a_number_of_rows_met_once_runs_plain_with_no_trial_and_no_copy(tiny_model, monkeypatch, packed_calls):
    """A prompt's one pass at its size made copies of most weights for one product each (a fresh `generate`
    on GPT-2 124M ran 0.89x --no-fast-cpu with every decision already known)."""
    monkeypatch.setattr(cpu_inference, "PLAIN_PASSES", REAL_PLAIN_PASSES)
    model = tiny_model.requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(model):
        cache = cpu_inference_cache(model, 1, 64)
        model.logits(model.hidden_states(torch.randint(0, 50257, (1, 7)), cache)[:, -1])  # a prompt: 7 rows, once
        assert packed_calls == [] and cpu_inference._trials == {}
        assert all(vars(m)["forward"].copies == {} for m in packed_linears(model))
        packed_per_pass = []
        for _ in range(REAL_PLAIN_PASSES + 1):  # decoding: 1 row, again and again
            before = len(packed_calls)
            model.logits(model.hidden_states(torch.randint(0, 50257, (1, 1)), cache)[:, -1])
            packed_per_pass.append(len(packed_calls) - before)
        wrapped = len(packed_linears(model))
    # the LM head met 1 row in the prompt's pass already (the last position's logits): one pass sooner
    assert packed_per_pass == [0] * (REAL_PLAIN_PASSES - 1) + [1, wrapped]


@pytest.mark.parametrize("speedup", [1.25, 2.0])
def test_a_decided_copy_waits_until_the_passes_so_far_would_have_paid_for_it(
    tiny_model, monkeypatch, packed_calls, speedup
):
    """A fresh `generate` of 48 tokens (GPT-2 124M, every decision saved by an earlier run) ran 0.93x
    --no-fast-cpu: it copied the LM head for a product that saved 4% of a token 48 times."""
    monkeypatch.setattr(cpu_inference, "PLAIN_PASSES", REAL_PLAIN_PASSES)
    monkeypatch.setattr(cpu_inference, "COPY_COST", REAL_COPY_COST)
    pays = {"plain": 1.0, "packed": speedup, "transposed": 1.0, "mkl_packed": 1.0}
    monkeypatch.setattr(
        LinearGroup, "speedups", lambda group, rows: cpu_inference._speedups.setdefault((*group.key, rows), pays)
    )
    wait = REAL_COPY_COST["packed"] / (1 - 1 / speedup)  # passes
    model = tiny_model.requires_grad_(False)
    packed_per_pass = []
    with torch.inference_mode(), fast_cpu_inference(model):
        cache = cpu_inference_cache(model, 1, model.config.max_seq_len)
        for _ in range(int(wait) + 2):
            before = len(packed_calls)
            model.logits(model.hidden_states(torch.randint(0, 50257, (1, 1)), cache)[:, -1])
            packed_per_pass.append(len(packed_calls) - before)
            if len(packed_calls) == 0:
                assert all(vars(m)["forward"].copies == {} for m in packed_linears(model))
        wrapped = len(packed_linears(model))
    assert packed_per_pass == [0] * int(wait) + [wrapped] * 2


def packed_per_pass(model, cache, rows: int, passes: int, packed_calls: list[int]) -> list[int]:
    """Decode `passes` steps of `rows` rows: how many products ran packed in each."""
    counts = []
    for _ in range(passes):
        before = len(packed_calls)
        model.logits(model.hidden_states(torch.randint(0, 50257, (rows, 1)), cache)[:, -1])
        counts.append(len(packed_calls) - before)
    return counts


def with_real_waits(monkeypatch, speedup: float | None = None) -> None:
    """PLAIN_PASSES and COPY_COST as the commands have them; `speedup`: every trial found packed that fast."""
    monkeypatch.setattr(cpu_inference, "PLAIN_PASSES", REAL_PLAIN_PASSES)
    monkeypatch.setattr(cpu_inference, "COPY_COST", REAL_COPY_COST)
    if speedup is not None:
        pays = {"plain": 1.0, "packed": speedup, "transposed": 1.0, "mkl_packed": 1.0}
        monkeypatch.setattr(
            LinearGroup, "speedups", lambda group, rows: cpu_inference._speedups.setdefault((*group.key, rows), pays)
        )


def test_copies_made_for_one_number_of_rows_serve_another_without_a_second_wait(tiny_model, monkeypatch, packed_calls):
    """Found by an audit: a batch draining from 8 rows to 7, 6, 5 waited again at each size beside copies
    already made."""
    with_real_waits(monkeypatch, speedup=2.0)
    model = tiny_model.requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(model):
        wrapped = len(packed_linears(model))
        cache = cpu_inference_cache(model, 8, model.config.max_seq_len)
        eight = packed_per_pass(model, cache, 8, 30, packed_calls)
        assert eight[0] == 0 and eight[-1] == wrapped  # waited, then paid
        seven = packed_per_pass(model, cache.rows(0, 7), 7, REAL_PLAIN_PASSES + 1, packed_calls)
    assert seven == [0] * REAL_PLAIN_PASSES + [wrapped]  # a new size still runs its plain passes, then no wait


def test_a_trial_s_own_copies_are_used_once_it_decides(tiny_model, monkeypatch, packed_calls):
    """Found by an audit: a machine's first run made the copies in its trial and left them unused through the
    wait. The tiny model's groups are small enough that the trial copies every weight."""
    clock_of_costs(monkeypatch, packed_cost=lambda rows: 0.5, plain_cost=lambda rows: 1.0)
    with_real_waits(monkeypatch)
    monkeypatch.setattr(LinearGroup, "trial_wait", lambda group, rows: 0)  # the copies' wait alone, as it was
    model = tiny_model.requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(model):
        wrapped = len(packed_linears(model))
        cache = cpu_inference_cache(model, 1, model.config.max_seq_len)
        packed_per_pass(model, cache, 1, REAL_PLAIN_PASSES + 1, packed_calls)  # the trials start
        passes = 0
        while cpu_inference.on_trial(1):
            packed_per_pass(model, cache, 1, 1, packed_calls)
            passes += 1
            assert passes < cpu_inference.PASSES_TO_DECIDE
        assert packed_per_pass(model, cache, 1, 1, packed_calls) == [wrapped]


def test_a_long_run_makes_the_chosen_copies_at_once_and_the_engine_warm_up_makes_them(tiny_model, monkeypatch):
    """Found by an audit: with the wait, serve's warm-up made no copy, and a step in the middle of the first
    requests made them."""
    from examplegpt.batching import BatchEngine

    with_real_waits(monkeypatch, speedup=1.25)
    model = tiny_model.requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(model, long_run=True):
        BatchEngine(model, max_batch=2).warm_up()
        assert all(set(vars(m)["forward"].copies) == {"packed"} for m in packed_linears(model))
        assert not any("not used" in line for line in packing_report())


def test_the_reports_say_when_a_chosen_layout_waited_and_a_forced_one_never_waits(
    tiny_model, monkeypatch, packed_calls
):
    """Found by an audit: --verbose said "-> packed" after a short run whose products all ran plain."""
    with_real_waits(monkeypatch, speedup=1.25)
    model = tiny_model.requires_grad_(False)
    with torch.inference_mode():
        with fast_cpu_inference(model):
            cache = cpu_inference_cache(model, 1, model.config.max_seq_len)
            assert sum(packed_per_pass(model, cache, 1, 10, packed_calls)) == 0
            assert all("-> packed" in line and "not used" in line for line in packing_report() if "rows" in line)
        with fast_cpu_inference(model, "packed"):
            cache = cpu_inference_cache(model, 1, model.config.max_seq_len)
            assert packed_per_pass(model, cache, 1, 2, packed_calls) == [len(packed_linears(model))] * 2


def test_a_file_of_decisions_that_cannot_be_written_leaves_the_decision_to_the_process_and_no_litter(
    tmp_path, monkeypatch
):
    target = tmp_path / "layouts.json"
    target.mkdir()  # a folder where the file should be: the rename fails
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(target))
    saved_layouts.save(
        (512, 64, torch.float32, False, 1, 1), {"plain": 1.0, "packed": 2.0, "transposed": 1.0, "mkl_packed": 1.0}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layouts.json", "layouts.json.lock"]  # no partial file
    assert saved_layouts.load() == {}


def test_only_the_saved_decisions_for_the_block_s_own_weights_are_taken_and_reported(tmp_path, monkeypatch):
    """Found by an audit: every decision in the file was loaded, and --verbose listed other models' shapes."""
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(tmp_path / "layouts.json"))
    mine, other = (512, 64, torch.float32, False, 1, 1), (96, 32, torch.bfloat16, True, 3, 1)
    for key in (mine, other, mine, other):  # two trials each: kept without a third
        saved_layouts.save(key, {"plain": 1.0, "packed": 0.5, "transposed": 2.0, "mkl_packed": 1.0})
    head = torch.nn.Linear(64, 512, bias=False).requires_grad_(False)
    with torch.inference_mode(), fast_cpu_inference(head):
        head(torch.randn(1, 64))
    assert set(cpu_inference._speedups) == cpu_inference._saved == {mine}
    assert not any("bfloat16" in line for line in packing_report())


def test_a_trial_that_stayed_implausible_decides_for_its_process_only(tiny_model, tmp_path, monkeypatch):
    saved = tmp_path / "layouts.json"
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(saved))
    clock_of_costs(monkeypatch, packed_cost=lambda rows: 100.0, plain_cost=lambda rows: 1.0)  # every retry: a stall
    head = tiny_model.lm_head
    with torch.inference_mode(), fast_cpu_inference(head):
        while not cpu_inference._speedups:
            head(torch.zeros(1, head.in_features))
    assert not saved.exists()
    assert packing_report()[0].endswith("-> plain (this run's timings implausible: not kept for later runs)")


def test_an_implausible_trial_leaves_the_decision_to_an_earlier_run_s_trial(tiny_model, tmp_path, monkeypatch):
    """Found by an audit: the implausible timings were blended with the earlier trial's into the decision."""
    saved = tmp_path / "layouts.json"
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(saved))
    head = tiny_model.lm_head
    earlier = {"plain": 1.0, "packed": 1.5, "transposed": 0.9, "mkl_packed": 1.0}
    saved_layouts.save(
        (*cpu_inference.linear_kind(head), 1, 1), earlier
    )  # one earlier process's trial: not enough alone
    clock_of_costs(monkeypatch, packed_cost=lambda rows: 100.0, plain_cost=lambda rows: 1.0)  # every retry: a stall
    with torch.inference_mode(), fast_cpu_inference(head):
        while not cpu_inference._speedups:
            head(torch.zeros(1, head.in_features))
    assert list(cpu_inference._speedups.values()) == [earlier]
    assert (
        "-> packed (this run's timings implausible: not kept for later runs; an earlier run's trial decides)"
        in packing_report()[0]
    )
    assert saved_layouts.load()[(*cpu_inference.linear_kind(head), 1, 1)][1] == 1  # still one trial in the file


def _save_many(first: int, file: str) -> None:
    os.environ["EXAMPLEGPT_LAYOUT_CACHE"] = file
    for i in range(first, first + 25):
        saved_layouts.save(
            (i, 64, torch.float32, False, 1, 1), {"plain": 1.0, "packed": 1.5, "transposed": 1.0, "mkl_packed": 1.0}
        )


def test_processes_that_decide_at_once_keep_each_other_s_decisions(tmp_path, monkeypatch):
    """Found by an audit: the last writer won (4 processes x 50 decisions kept 52-65 of 200)."""
    import multiprocessing

    file = str(tmp_path / "layouts.json")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(_save_many, [(first, file) for first in (0, 100, 200, 300)])
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", file)
    assert len(saved_layouts.load()) == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layouts.json", "layouts.json.lock"]


def test_no_home_folder_keeps_no_decisions_and_a_relative_xdg_cache_is_ignored(monkeypatch):
    monkeypatch.delenv("EXAMPLEGPT_LAYOUT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setattr(Path, "home", lambda: Path("/home/someone"))
    assert saved_layouts.path() == Path("/home/someone/.cache/examplegpt/weight_layouts.json")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    assert saved_layouts.path() is None and saved_layouts.load() == {}


def test_a_file_nested_too_deep_to_parse_is_read_as_empty(tmp_path, monkeypatch):
    saved = tmp_path / "layouts.json"
    monkeypatch.setenv("EXAMPLEGPT_LAYOUT_CACHE", str(saved))
    saved.write_text("[" * 100_000 + "]" * 100_000)
    assert saved_layouts.load() == {}
