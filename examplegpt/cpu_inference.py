"""An optional accelerator for inference on CPU: Linear weights packed in oneDNN's layout, for one run.

A decode step multiplies one row per sequence by every weight matrix, so its speed is how fast the
weights stream through the cores. PyTorch's default CPU product (MKL, on nn.Linear's row-major
weight) streams them well below what the memory allows; oneDNN, with the weight reordered once into
its own blocked layout, streams them several times faster (BENCHMARKS.md, "Packed weights"). The
packed layout is the one PyTorch's compiler (Inductor, with freezing) gives Linear weights on CPU;
here it is used in eager mode and applied from outside the model: the commands (`generate`,
`evaluate`, `serve`) wrap their run in `fast_cpu_inference(model)` unless told `--no-fast-cpu`,
and library functions never switch it on by themselves.

Packing does not pay on every CPU at every batch size: on an AVX-512/AMX Xeon the packed product of
one row is about 10% slower than PyTorch's own while 8 rows run 1.7x faster (issue 24), where other
CPUs gain several times at one row (BENCHMARKS.md). So within the block each group of Linears that
share a weight shape runs packed or plain per number of rows, as a trial inside the model's first
passes at that number finds (`Trial`): the group's products alternate between the two ways, each
timed where it runs, and packed is kept only where its median is clearly faster. The decisions are
kept for the process, and `packing_summary` / `packing_report` say what was chosen.

The packed copies cost as much memory as the weights, so they live only as long as the block that
made them. The packed product has no gradient: the block refuses a model that autograd would train.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import statistics
import time
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# The number of rows oneDNN is told to expect, which picks the layout; any number of rows still works.
# 64 suits both one-row decode steps and batches (a hint of 1 picks a slower layout for both).
ROWS_HINT = 64

# The probe (a `Trial` per group and number of rows). Rows are measured in powers of two, up to PROBE_ROWS
# (past it the products are bound by arithmetic, not by streaming the weights: one trial stands for every size).
PROBE_ROWS = 128
PROBE_SAMPLES = 5  # timed products of each way, after the first of each (which builds its kernel)
# A trial whose ratio falls outside these bounds timed the machine's other work, not the products (measured
# ratios run from about 0.6 to 2.5): it starts again, at most RETRIES times, before its result stands.
PLAUSIBLE_SPEEDUPS = (0.2, 5.0)
RETRIES = 2
# Passes of the model that settle every trial at one number of rows, on a busy machine too (every retry
# taken): a group of one weight (the LM head) runs one product a pass; a block's group of 12 weights, 12.
PASSES_TO_DECIDE = (RETRIES + 1) * 2 * (PROBE_SAMPLES + 1)
PACKED_MARGIN = 1.05  # packed must be at least 5% faster to be used: a tie, within noise, stays plain PyTorch

# (out, in, dtype, bias, weights in the group, rows measured) -> plain time / packed time, for the process
_speedups: dict[tuple, float] = {}
_trials: dict[tuple, Trial] = {}  # the same keys, while undecided

AUTOGRAD_REFUSED = (
    "fast_cpu_inference is for inference only: the packed product has no gradient, and this model has "
    "parameters that require grad while grad mode is on. Run it under torch.inference_mode() or "
    "torch.no_grad(), or call model.requires_grad_(False) first."
)


def kv_cache_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype to keep keys and values in for a model computing in `dtype` on `device`.

    On CPU, attention of one new token over a bfloat16 cache is several times slower than over a
    float32 one (BENCHMARKS.md), so a bfloat16 model keeps a float32 cache.
    """
    return torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 else dtype


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN is in this PyTorch build, works on this CPU, and takes this weight (CPU, float32 or bfloat16)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and _onednn_packs_right(weight.dtype)
    )


@functools.cache
def _onednn_packs_right(dtype: torch.dtype) -> bool:
    """The two (private) oneDNN ops exist in this build and compute what F.linear does in `dtype`, tried once.

    They are what PyTorch's compiler emits, not a public API: a PyTorch whose ops differ is run unpacked,
    and so is bfloat16 on a CPU without the instructions oneDNN's bfloat16 path needs (AVX-512 BF16 or BW).
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        weight, bias, x = (torch.randn(shape).to(dtype) for shape in ((24, 16), (24,), (3, 16)))
        packed = _pack(weight)
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        return torch.allclose(_packed_forward(packed, bias, x), F.linear(x, weight, bias), atol=tolerance)
    except (RuntimeError, TypeError, AttributeError):
        return False


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)  # (out, in), oneDNN's blocks


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (..., out)


def _weight_state(weight: torch.Tensor) -> tuple:
    """What the weight is: a change in place moves its version, a `.to(...)` its storage or dtype."""
    # a tensor made under torch.inference_mode has no version counter: only a replacement is seen
    version = None if weight.is_inference() else weight._version
    return weight.data_ptr(), version, weight.dtype, weight.shape


def rows_measured(rows: int) -> int:
    """The number of rows a product of `rows` rows is probed at: the next power of two, at most PROBE_ROWS."""
    return min(1 << (rows - 1).bit_length(), PROBE_ROWS)


class PackedGroup:
    """The Linears of one block that share a weight shape, dtype and bias: packed or plain, per rows, together."""

    def __init__(self, forwards: list[PackedLinearForward], probe: bool) -> None:
        self.forwards = forwards
        self.probe = probe  # False: packed at every size (benchmarks, tests)
        weight = forwards[0].linear.weight
        # the count is part of the key: a dozen weights stream from memory where one may sit in the cache
        self.key = (*weight.shape, weight.dtype, forwards[0].linear.bias is not None, len(forwards))

    def product(self, forward: PackedLinearForward, x: torch.Tensor) -> torch.Tensor:
        """`forward`'s product: packed or plain as decided for this many rows or, until then, as the trial's turn says."""
        if not self.probe:
            return forward.packed_product(x)
        key = (*self.key, rows_measured(x.numel() // x.shape[-1]))
        speedup = self.speedup(key[-1])
        if speedup is None:
            return _trials.setdefault(key, Trial(key)).run(forward, x)
        return forward.packed_product(x) if speedup >= PACKED_MARGIN else forward.plain_product(x)

    def speedup(self, rows: int) -> float | None:
        """Plain time / packed time of the group's products at `rows` rows (for the process); None while on trial."""
        return _speedups.get((*self.key, rows))


class Trial:
    """Packed against plain for one group at one number of rows, timed inside the model's own passes.

    The products alternate, call by call, between the two ways until each has PROBE_SAMPLES timings
    (the first call of each builds its kernel and is not counted); then the medians decide, for the
    process. Timed in place, a product meets the caches as the rest of the model leaves them; timed
    apart, a weight read again and again can stay in a large L3 cache and favour the wrong way.
    """

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.calls = 0
        self.retries = 0
        self.seconds: dict[bool, list[float]] = {True: [], False: []}  # packed? -> timings

    def run(self, forward: PackedLinearForward, x: torch.Tensor) -> torch.Tensor:
        packed = self.calls % 2 == 0
        self.calls += 1
        start = _clock()
        y = forward.packed_product(x) if packed else forward.plain_product(x)
        elapsed = _clock() - start
        if self.calls > 2:
            self.seconds[packed].append(elapsed)
        if self.timings >= PROBE_SAMPLES:  # (once decided, the group no longer calls the trial)
            speedup = statistics.median(self.seconds[False]) / statistics.median(self.seconds[True])
            low, high = PLAUSIBLE_SPEEDUPS
            if not low <= speedup <= high and self.retries < RETRIES:
                self.retries += 1
                self.seconds = {True: [], False: []}
            else:
                _speedups[self.key] = speedup
        return y

    @property
    def timings(self) -> int:
        return min(map(len, self.seconds.values()))


def on_trial(rows: int) -> bool:
    """Whether some group's trial at this many rows has not decided yet (in this process)."""
    measured = rows_measured(rows)
    return any(key[-1] == measured and key not in _speedups for key in _trials)


_clock = time.perf_counter  # what trials time with (a test gives them a clock of its own)


class PackedLinearForward:
    """The forward an nn.Linear runs inside `fast_cpu_inference`: its packed weight (packed again if it
    changes) where its group's trial found packing faster for this many rows, else the plain product."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.state = _weight_state(linear.weight)
        self.packed: torch.Tensor | None = _pack(linear.weight)
        self.group: PackedGroup | None = None  # set by fast_cpu_inference

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
            raise RuntimeError(AUTOGRAD_REFUSED)  # the packed product would drop the gradient silently
        state = _weight_state(weight)
        if state != self.state:
            self.state, self.packed = state, _pack(weight) if can_pack(weight) else None
        if self.packed is None:
            return F.linear(x, weight, bias)  # moved to a device or dtype oneDNN does not take
        return self.group.product(self, x)

    def packed_product(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_forward(self.packed, self.linear.bias, x)

    def plain_product(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.linear.weight, self.linear.bias)


@contextlib.contextmanager
def fast_cpu_inference(model: nn.Module, probe: bool = True) -> Iterator[None]:
    """Within the block, each nn.Linear of `model` that oneDNN can take multiplies by its packed weight,
    at the numbers of rows where its group's trial found that faster (`probe=False`: at every number).

    Where oneDNN cannot take the weights (CUDA, MPS, float16, a build without it) the model runs as
    it is. Blocks nest: an inner block leaves the Linears an outer one packed to the outer one.
    Raises RuntimeError for a model autograd would train (grad mode on, parameters requiring grad).
    """
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        raise RuntimeError(AUTOGRAD_REFUSED)
    # a Linear whose forward is already shadowed belongs to an enclosing block (or to someone else)
    linears = [
        m for m in model.modules() if isinstance(m, nn.Linear) and "forward" not in vars(m) and can_pack(m.weight)
    ]
    try:
        groups: dict[tuple, list[PackedLinearForward]] = {}
        for linear in linears:
            linear.forward = PackedLinearForward(linear)  # shadows the class's forward
            shape = (*linear.weight.shape, linear.weight.dtype, linear.bias is not None)
            groups.setdefault(shape, []).append(linear.forward)
        for forwards in groups.values():
            group = PackedGroup(forwards, probe)
            for forward in forwards:
                forward.group = group
        yield
    finally:
        for linear in linears:  # the packed copies go with the forwards that hold them
            vars(linear).pop("forward", None)


NONE_TRIED = "packed weights: none tried"  # the words of packing_summary and packing_report alike


def packing_report() -> list[str]:
    """One line per weight shape and number of rows tried in this process: the speed-up and the choice, or
    how far its trial has come; where none was tried (int8 or float16 weights, say), a line that says why."""
    if not _speedups.keys() | _trials.keys():
        return [f"{NONE_TRIED}: only float32 weights on a CPU are packed, and bfloat16 ones on a CPU with AVX-512"]
    lines = []
    keys = sorted(_speedups.keys() | _trials.keys(), key=lambda key: (key[-1], key[:2]))
    for key in keys:
        out_features, in_features, dtype, _, count, rows = key
        where = f"{count} x Linear({in_features}, {out_features}, {str(dtype).removeprefix('torch.')}), " + (
            f"{rows}{'+' if rows == PROBE_ROWS else ''} rows"
        )
        if key in _speedups:
            choice = "packed" if _speedups[key] >= PACKED_MARGIN else "plain"
            lines.append(f"{where}: packed {_speedups[key]:.2f}x plain -> {choice}")
        else:
            lines.append(f"{where}: on trial ({_trials[key].timings} of {PROBE_SAMPLES} timings each so far)")
    return lines


def packing_summary() -> str:
    """The choices in this process, per number of rows, in a few words (for a start-up line): how many weight
    shapes run packed of those tried, and how many are still on trial."""
    tried = collections.Counter(key[-1] for key in _speedups.keys() | _trials.keys())
    packed = collections.Counter(key[-1] for key, speedup in _speedups.items() if speedup >= PACKED_MARGIN)
    pending = collections.Counter(key[-1] for key in _trials.keys() - _speedups.keys())
    if not tried:
        return NONE_TRIED
    parts = [
        f"{rows}{'+' if rows == PROBE_ROWS else ''}: {packed[rows]}/{tried[rows]}"
        + (f" ({pending[rows]} on trial)" if pending[rows] else "")
        for rows in sorted(tried)
    ]
    return "packed weight shapes at rows " + ", ".join(parts)
