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
share a weight shape runs packed or plain per number of rows, as measured the first time the group
meets that number (`PackedGroup.speedup`): both products over the group's weights, five alternating
pairs, packed kept only where the median pair shows it clearly faster. The measurements are kept for
the process, on the thread that runs the model (the probe is part of its first forward pass at a new
size), and `packing_summary` / `packing_report` say what was chosen.

The packed copies cost as much memory as the weights, so they live only as long as the block that
made them. The packed product has no gradient: the block refuses a model that autograd would train.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# The number of rows oneDNN is told to expect, which picks the layout; any number of rows still works.
# 64 suits both one-row decode steps and batches (a hint of 1 picks a slower layout for both).
ROWS_HINT = 64

# The probe. Rows are measured in powers of two, up to PROBE_ROWS (past it the products are bound by
# arithmetic, not by streaming the weights, and one measurement stands for every size). A pass runs
# every weight of the group (so they stream from memory, as in the model) unless that passes PROBE_MACS.
PROBE_ROWS = 128
PROBE_MACS = 5 * 10**8
PROBE_REPEATS = 5
PACKED_MARGIN = 1.05  # packed must be at least 5% faster to be used: a tie, within noise, stays plain PyTorch

# (out, in, dtype, bias, weights in the group, rows measured) -> plain time / packed time, for the process
_speedups: dict[tuple, float] = {}

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

    def packed_pays(self, rows: int) -> bool:
        return not self.probe or self.speedup(rows_measured(rows)) >= PACKED_MARGIN

    def speedup(self, rows: int) -> float:
        """Plain time / packed time of the group's products at `rows` rows, measured once per process."""
        key = (*self.key, rows)
        if key not in _speedups:
            _speedups[key] = self.measure(rows)
        return _speedups[key]

    def measure(self, rows: int) -> float:
        forwards = [f for f in self.forwards if f.packed is not None]
        if not forwards:
            return 0.0
        out_features, in_features = forwards[0].linear.weight.shape
        forwards = forwards[: max(1, PROBE_MACS // (rows * in_features * out_features))]
        x = torch.randn(rows, in_features, dtype=forwards[0].linear.weight.dtype)

        def plain() -> None:
            for f in forwards:
                F.linear(x, f.linear.weight, f.linear.bias)

        def packed() -> None:
            for f in forwards:
                _packed_forward(f.packed, f.linear.bias, x)

        seconds: dict[Callable[[], None], list[float]] = {plain: [], packed: []}
        with torch.no_grad():
            plain()  # the first calls pick (and build) the kernels
            packed()
            for _ in range(PROBE_REPEATS):  # alternately: a burst of the machine's other load hits both
                for run in seconds:
                    seconds[run].append(_seconds(run))
        # the median pair, not the best times: one pair stalled by the machine's other work does not decide
        return statistics.median(p / q for p, q in zip(seconds[plain], seconds[packed]))


def _seconds(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


class PackedLinearForward:
    """The forward an nn.Linear runs inside `fast_cpu_inference`: its packed weight (packed again if it
    changes) where its group's probe found packing faster for this many rows, else the plain product."""

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
        if self.packed is None or not self.group.packed_pays(x.numel() // x.shape[-1]):
            return F.linear(x, weight, bias)  # moved to a device or dtype oneDNN does not take, or not faster here
        return _packed_forward(self.packed, bias, x)


@contextlib.contextmanager
def fast_cpu_inference(model: nn.Module, probe: bool = True) -> Iterator[None]:
    """Within the block, each nn.Linear of `model` that oneDNN can take multiplies by its packed weight,
    at the numbers of rows where the probe found that faster (`probe=False`: at every number).

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


def packing_report() -> list[str]:
    """One line per weight shape and number of rows probed in this process: the speed-up and the choice."""
    lines = []
    for key, speedup in sorted(_speedups.items(), key=lambda item: (item[0][-1], item[0][:2])):
        out_features, in_features, dtype, _, count, rows = key
        choice = "packed" if speedup >= PACKED_MARGIN else "plain"
        lines.append(f"{count} x Linear({in_features}, {out_features}, {str(dtype).removeprefix('torch.')}), "
                     f"{rows}{'+' if rows == PROBE_ROWS else ''} rows: packed {speedup:.2f}x plain -> {choice}")  # fmt: skip
    return lines


def packing_summary() -> str:
    """The probe's choices in this process, per number of rows, in a few words (for a start-up line)."""
    by_rows: dict[int, list[bool]] = {}
    for (*_, rows), speedup in _speedups.items():
        by_rows.setdefault(rows, []).append(speedup >= PACKED_MARGIN)
    if not by_rows:
        return "packed weights: not probed"
    parts = [f"{rows}{'+' if rows == PROBE_ROWS else ''}: {sum(c)}/{len(c)}" for rows, c in sorted(by_rows.items())]
    return "packed weight shapes at rows " + ", ".join(parts)
