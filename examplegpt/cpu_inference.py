"""An optional accelerator for inference on CPU: Linear weights copied into faster layouts, for one run.

A decode step multiplies one row per sequence by every weight matrix, so its speed is how fast the
weights stream through the cores. PyTorch's default CPU product (MKL, on nn.Linear's row-major
(out, in) weight) streams them well below what the memory allows. Three copies of a weight can be
faster: oneDNN's blocked layout ("packed", the one PyTorch's compiler, Inductor with freezing, gives
Linear weights on CPU), used here in eager mode; the weight transposed to a contiguous (in, out)
matrix ("transposed"), which MKL streams faster on some CPUs for weights with more outputs than inputs
(BENCHMARKS.md, "Weight layouts"); and MKL's own packed format ("mkl_packed", float32 only: what
Inductor with freezing gives a Linear whose number of rows it knows), most often the fastest for the
blocks' products of 8-16 rows on a Xeon with AMX (BENCHMARKS.md, "MKL's packed format"). It is applied
from outside the model: the commands (`generate`, `evaluate`, `serve`) wrap their run in
`fast_cpu_inference(model)` unless told `--no-fast-cpu`, and library functions never switch it on by
themselves.

Which layout is fastest depends on the CPU, the weight's shape and the number of rows: on an
AVX-512/AMX Xeon the packed product of one row is about 10% slower than PyTorch's own while 8 rows
run 1.7x faster (issue 24), where other CPUs gain several times at one row (BENCHMARKS.md). So within
the block each group of Linears that share a weight shape runs in one layout per number of rows, as a
trial inside the model's first passes at that number finds (`Trial`): the group's products go round
the layouts, each timed where it runs, and a copy is used only where its median is clearly faster
than plain. A trial, and then the copies still missing, wait (unless the run is long: a server) until the
passes run so far would have paid for them (`COPY_COST`: a short run stays plain); where the caller says
how many passes it will run at most (`generate`, `evaluate`), one that those cannot repay is not made. The
decisions are kept for the process, and in a file for later ones on the same machine (`saved_layouts`: a
later command copies only the layouts chosen); `packing_summary` / `packing_report` say what was chosen,
and which decisions came from the file.

A copy costs as much memory as the weight (MKL's packed copy reserves more address space than it
fills): it is made when a trial first needs it, dropped once the group's trials have all decided and
none chose it, and lives at most as long as the block. The copies' products have no gradient: the
block refuses a model that autograd would train.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import operator
import statistics
import time
import weakref
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrize import is_parametrized

from . import saved_layouts

# The number of rows oneDNN is told to expect, which picks the layout; any number of rows still works.
# 64 suits both one-row decode steps and batches (a hint of 1 picks a slower layout for both).
ROWS_HINT = 64

# The layouts a Linear's weight can be multiplied in. plain: nn.Linear's own (out, in) weight, PyTorch's
# product (MKL); packed: a copy in oneDNN's blocked layout; transposed: a contiguous (in, out) copy, x @ W^T;
# mkl_packed: a copy in MKL's packed format (cblas_sgemm_pack), multiplied by MKL's packed product (float32)
LAYOUTS = ("plain", "packed", "transposed", "mkl_packed")
FASTER_MARGIN = 1.05  # a copy must be at least 5% faster than plain: a tie, within noise, stays plain PyTorch

# The probe (a `Trial` per group and number of rows). Rows are measured in powers of two, up to PROBE_ROWS
# (past it the products are bound by arithmetic, not by streaming the weights: one trial stands for every size).
PROBE_ROWS = 128
PROBE_SAMPLES = 5  # timed products of each way, after the first of each (which builds its kernel)
# A long run (a server, which settles every trial in its warm-up) times more products of each way: on a busy
# machine five each ranked the layouts wrongly too often (BENCHMARKS.md, "Issue 24 on the Xeon VM, third day")
LONG_RUN_SAMPLES = 15
# A trial times the products of a group's first few weights only (the others run plain meanwhile): copies
# are made of these alone, where a copy of every weight in every layout cost a fresh command more than the
# trial's slower products (GPT-2 124M: a gigabyte, 0.3 s; BENCHMARKS.md, "Issue 24 on the Xeon VM").
TIMED_WEIGHTS = len(LAYOUTS)
# A number of rows that the block has run fewer passes at runs plain: no trial, no copy. A copy takes as
# long as a dozen products by the weight (its memory is new), so a size met once (a prompt) would pay for
# copies it uses once (GPT-2 124M: most of its weights packed, for a prompt of 5-8 tokens).
PLAIN_PASSES = 2
# A decided layout's missing copies wait until the passes run so far at that many rows would have paid for
# them (a ski rental: a run that goes on as long again earns them back; one that stops sooner never paid for
# them), where copying at once left a short `generate` 7% behind plain. A copy in fresh memory costs about
# COPY_COST one-row products by its weight, and saves (1 - 1/speed-up) of a product; a product of r rows
# takes at least max(1, r / STREAMING_ROWS) one-row products' time (BENCHMARKS.md, "Issue 24 on the Xeon
# VM, second day").
COPY_COST = {"packed": 10, "transposed": 20, "mkl_packed": 10}
STREAMING_ROWS = 32
# A trial waits in the same way, until the passes so far would have paid for its copies were a layout
# FASTER_MARGIN faster (the least a trial acts on): where a trial started at a size's third pass, a fresh
# machine's `generate` of 50 tokens ran 0.80x plain (GPT-2 124M; BENCHMARKS.md). Where the caller says how
# many passes it will run at most (`generate`: its new tokens), a trial or a copy whose bet those cannot
# repay is not made at all.
# A trial whose ratio falls outside these bounds timed the machine's other work, not the products (measured
# ratios run from about 0.6 to 2.5): it starts again, at most RETRIES times, before its result stands.
PLAUSIBLE_SPEEDUPS = (0.2, 5.0)
RETRIES = 2
# A saved decision stands without a trial once this many processes' trials made it (trials that ran at the
# same time count as one), each layout at the geometric mean of their speed-ups: one trial at a busy moment
# chose layouts that left GPT-2 124M at 0.95x plain at batch 1 for every later command (BENCHMARKS.md,
# "Issue 24 on the Xeon VM, second day"). Until then a process runs its own trial too, and decides by all
# of them (`saved_layouts.combined`).
TRIALS_TO_KEEP = 2
# Passes of the model that settle a long run's every trial at one number of rows, on a busy machine too (every
# retry taken): a group of one weight (the LM head) times one product a pass; a block's group, TIMED_WEIGHTS.
PASSES_TO_DECIDE = (RETRIES + 1) * len(LAYOUTS) * (LONG_RUN_SAMPLES + 1)

# (out, in, dtype, bias, weights in the group, rows measured) -> {layout: plain time / its time}, for the process
_speedups: dict[tuple, dict[str, float]] = {}
_saved: set[tuple] = set()  # the keys of _speedups that earlier processes decided (saved_layouts.py)
_earlier: dict[tuple, tuple[dict[str, float], int]] = {}  # fewer than TRIALS_TO_KEEP saved: (speed-ups, trials)
_merged: set[tuple] = set()  # the keys of _speedups decided by this process's trial and an earlier one's
_used: set[tuple] = set()  # the keys whose chosen copies some block has used (not only waited for)
_met: set[tuple] = set()  # the keys some block's products met in this process (the reports name these only)
_short: set[tuple] = set()  # the keys whose trial waited for the run to repay it (or that the run could not)
_unsaved: set[tuple] = set()  # the keys whose trial's timings stayed implausible: decided for the process only
_trials: dict[tuple, Trial] = {}  # the same keys, while undecided
_live_groups: weakref.WeakSet[LinearGroup] = weakref.WeakSet()  # the groups of the blocks still open

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
        and weight.numel() > 0  # oneDNN refuses an empty weight
        and weight.dtype in (torch.float32, torch.bfloat16)
        and _onednn_packs_right(weight.dtype)
    )


def _without_autocast() -> contextlib.AbstractContextManager:
    """Where an op's check runs: a first call under torch.autocast would compare bfloat16 results with float32."""
    return torch.autocast("cpu", enabled=False)


@functools.cache
def _onednn_packs_right(dtype: torch.dtype) -> bool:
    """The two (private) oneDNN ops exist in this build and compute what F.linear does in `dtype`, tried once.

    They are what PyTorch's compiler emits, not a public API: a PyTorch whose ops differ is run unpacked,
    and so is bfloat16 on a CPU without the instructions oneDNN's bfloat16 path needs (AVX-512 BF16 or BW).
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        with _without_autocast():
            numbers = torch.Generator().manual_seed(0)  # (not the caller's: its sampling stays as seeded)
            shapes = ((24, 16), (24,), (3, 16))
            weight, bias, x = (torch.randn(shape, generator=numbers, dtype=torch.float32).to(dtype) for shape in shapes)
            packed = _pack(weight)
            tolerance = 1e-4 if dtype == torch.float32 else 5e-2
            return torch.allclose(_packed_forward(packed, bias, x), F.linear(x, weight, bias), atol=tolerance)
    except (RuntimeError, TypeError, AttributeError):
        return False


def layouts_for(dtype: torch.dtype) -> tuple[str, ...]:
    """The layouts tried for weights of `dtype` (that oneDNN takes): MKL's packed product is for float32 only."""
    if dtype == torch.float32 and _mkl_packs_right():
        return LAYOUTS
    return tuple(layout for layout in LAYOUTS if layout != "mkl_packed")


@functools.cache
def _mkl_packs_right() -> bool:
    """The two (private) MKL ops exist in this build and compute what F.linear does, tried once, for numbers of
    rows other than the one the weight was packed for: the ops are what Inductor emits for one known number
    of rows, and MKL's packed buffer describes its own format, so one copy serves every number."""
    if not (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")):
        return False
    try:
        with _without_autocast():
            numbers = torch.Generator().manual_seed(0)  # (not the caller's: its sampling stays as seeded)
            weight, bias = (torch.randn(*shape, generator=numbers, dtype=torch.float32) for shape in ((40, 24), (40,)))
            packed = _mkl_pack(weight)
            return all(
                torch.allclose(_mkl_packed_forward(packed, weight, bias, x), F.linear(x, weight, bias), atol=1e-4)
                for x in (
                    torch.randn(rows, 24, generator=numbers, dtype=torch.float32)
                    for rows in (1, 3, ROWS_HINT, 2 * ROWS_HINT + 5)
                )
            )
    except (RuntimeError, TypeError, AttributeError):
        return False


def _mkl_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), ROWS_HINT)  # MKL's packed buffer, opaque


def _mkl_packed_forward(
    packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """x (..., in) times the weight through its MKL-packed copy, + bias: (..., out)."""
    if x.shape[-1] != weight.shape[1]:
        return F.linear(x, weight, bias)  # its error: the packed product reads `in` numbers a row, unchecked
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    # told N rows, the op takes the packed copy (told another number, it falls back to `weight`)
    y = torch.ops.mkl._mkl_linear(rows, packed, weight, bias, rows.shape[0])  # (N, out)
    return y.view(*x.shape[:-1], weight.shape[0])


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)  # (out, in), oneDNN's blocks


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # oneDNN reads a strided bias as if it were contiguous
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (..., out)


def _transposed_forward(weight_t: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight_t (in, out), contiguous, + bias: (..., out)."""
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    y = rows @ weight_t if bias is None else torch.addmm(bias, rows, weight_t)  # (N, out)
    return y.view(*x.shape[:-1], weight_t.shape[1])


def _weight_state(weight: torch.Tensor) -> tuple:
    """What the weight is: a change in place moves its version, a replacement (`.to(...)`, a new tensor) its
    address or dtype (FastLinearForward keeps the copied weight alive, so that no replacement can come back
    at its address). Not seen: a change in place of a tensor made under torch.inference_mode (it has no
    version counter) or through `.data` (which has a counter of its own)."""
    version = None if weight.is_inference() else weight._version
    return weight.data_ptr(), version, weight.dtype, weight.shape


def rows_measured(rows: int) -> int:
    """The number of rows a product of `rows` rows is probed at: the next power of two, at most PROBE_ROWS."""
    return min(1 << (rows - 1).bit_length(), PROBE_ROWS)


def linear_kind(linear: nn.Linear) -> tuple:
    """What a Linear's products are timed and decided by: (out, in, dtype, has a bias)."""
    return *linear.weight.shape, linear.weight.dtype, linear.bias is not None


def plausible(speedups: dict[str, float]) -> bool:
    """Whether every speed-up is within PLAUSIBLE_SPEEDUPS: else the trial timed the machine's other work."""
    low, high = PLAUSIBLE_SPEEDUPS
    return all(low <= speedup <= high for speedup in speedups.values())


def chosen(speedups: dict[str, float]) -> str:
    """The layout a trial's speed-ups (plain time / each layout's time) choose: the fastest, if FASTER_MARGIN
    faster than plain."""
    fastest = max(speedups, key=speedups.get)
    return fastest if speedups[fastest] >= FASTER_MARGIN else "plain"


class LinearGroup:
    """The Linears of one block that share a weight shape, dtype and bias: one layout per number of rows, for all."""

    def __init__(
        self, forwards: list[FastLinearForward], layout: str | None, long_run: bool = False, passes: int | None = None
    ) -> None:
        self.forwards = forwards
        self.layouts = layouts_for(forwards[0].linear.weight.dtype)
        # None: as the trials decide; else this layout at every size (benchmarks), plain where the dtype lacks it
        self.layout = layout if layout in (None, *self.layouts) else "plain"
        self.long_run = long_run  # trials and copies made at once, without waiting: the run will pay for them
        self.passes = passes  # the most passes of the model the caller expects the block to run, if it knows
        # the count is part of the key: a dozen weights stream from memory where one may sit in the cache
        self.key = (*linear_kind(forwards[0].linear), len(forwards))
        # rows -> the layout decided for them: a decode step's dozens of products look it up, nothing more
        self.decided: dict[int, str] = {0: "plain"}  # zero rows: nothing to multiply, nor to time
        self.products: collections.Counter[int] = collections.Counter()  # per number of rows, until decided
        # rows -> how many products at that many rows run plain: PLAIN_PASSES' worth, then as many as would pay
        # for a trial, then (once a layout is decided) for its missing copies (`wait`), when looked at again
        self.plain_until: dict[int, float] = {}
        self.trying: set[int] = set()  # the numbers of rows whose trial this block's products take part in
        _live_groups.add(self)

    def layout_for(self, rows: int) -> str | None:
        """The layout for products of `rows` rows: the forced one, plain for the block's first PLAIN_PASSES at
        this many rows, and until the run so far would have paid for a trial (`wait`); then None while on trial;
        then plain until the decided layout's missing copies would have paid for themselves; then the decided
        one."""
        layout = self.layout or self.decided.get(rows)
        if layout is None:
            if rows not in self.products:
                _met.add((*self.key, rows_measured(rows)))
            self.products[rows] += 1
            if self.products[rows] <= self.plain_until.get(rows, PLAIN_PASSES * len(self.forwards)):
                return "plain"
            speedups = self.speedups(rows_measured(rows))
            if speedups is None:
                if rows not in self.trying:  # (once begun, a trial goes on to its end)
                    wait = self.trial_wait(rows)
                    if self.products[rows] <= wait:
                        _short.add((*self.key, rows_measured(rows)))
                        self.plain_until[rows] = wait
                        return "plain"
                    self.trying.add(rows)
                return None
            layout = chosen(speedups)
            wait = self.copies_wait(layout, speedups[layout], rows)
            if self.products[rows] <= wait:
                self.plain_until[rows] = wait
                return "plain"
            self.decided[rows] = layout
            if layout != "plain":
                _used.add((*self.key, rows_measured(rows)))
        return layout

    def trial_wait(self, rows: int) -> float:
        """The products at `rows` rows after which a trial starts: once the run so far would have paid for the
        trial's copies (each layout's copy of each weight it times), were a layout FASTER_MARGIN faster."""
        timed = min(len(self.forwards), TIMED_WEIGHTS)
        trial_products = (PROBE_SAMPLES + 1) * len(self.layouts) * len(self.forwards) / timed  # its own, unretried
        copies = timed * sum(COPY_COST[layout] for layout in self.layouts if layout != "plain")
        return self.wait(1 - 1 / FASTER_MARGIN, copies, rows, after=trial_products)

    def copies_wait(self, layout: str, speedup: float, rows: int) -> float:
        """The products at `rows` rows after which the copies of the group's weights in `layout` not made yet are
        made: once the run so far would have paid for them."""
        if layout == "plain":
            return 0
        cost = sum(layout not in forward.copies for forward in self.forwards) * COPY_COST[layout]
        return self.wait(1 - 1 / speedup, cost, rows)

    def wait(self, saving: float, cost: float, rows: int, after: float = 0) -> float:
        """The products at `rows` rows (counted from the block's first) that, each `saving` (a fraction) faster,
        would save `cost` one-row products: a ski rental, betting that a run goes on as long again as it has run.
        0 for a long run; never (inf) where the passes the caller expects would end before the bet is repaid
        (`after`: products at the start of the bet that save nothing, a trial's own)."""
        if self.long_run:
            return 0
        repaying = cost / (saving * max(1, rows / STREAMING_ROWS))
        bet_at = max(self.products[rows], repaying)
        if self.passes is not None and self.passes * len(self.forwards) < bet_at + after + repaying:
            return math.inf
        return repaying

    def trial_product(self, forward: FastLinearForward, x: torch.Tensor, rows: int) -> torch.Tensor:
        """`forward`'s product in the layout whose turn it is in the trial at this many rows."""
        key = (*self.key, rows_measured(rows))
        if key not in _trials:
            _trials[key] = Trial(key, self.layouts, LONG_RUN_SAMPLES if self.long_run else PROBE_SAMPLES)
        return _trials[key].run(forward, x)

    def speedups(self, rows: int) -> dict[str, float] | None:
        """Each layout's speed-up over plain for the group's products at `rows` rows; None while on trial."""
        return _speedups.get((*self.key, rows))

    def drop_unused_copies(self) -> None:
        """Once none of the group's trials is running, free the copies of the layouts that no number of rows
        chose (a trial at a number of rows not seen yet makes them again)."""
        mine = [key for key in _trials.keys() | _speedups.keys() if key[:-1] == self.key]
        if any(key not in _speedups for key in mine):
            return
        used = {chosen(_speedups[key]) for key in mine}
        for forward in self.forwards:
            forward.keep_only(used)


class Trial:
    """The layouts against one another for one group at one number of rows, timed inside the model's own passes.

    The products of the group's first TIMED_WEIGHTS weights go round the layouts, call by call, until
    each layout has `samples` timings (the first call of each at a number of rows builds its kernel and is
    not counted, and no timing includes making a copy); then the medians decide, for the process (and, through
    saved_layouts, for later ones). A trial stands for a range of numbers of rows (9-16, say) and keeps
    each number's timings apart, the first number to have them all deciding: oneDNN builds a kernel for
    each new shape, and a product at 9 rows is not one at 16 (pooled, a warm-up running 9, 10, ... 16 in
    turn made packing look several times slower). Timed in place, a product meets the caches as the rest
    of the model leaves them; timed apart, a weight read again and again can stay in a large L3 cache and
    favour the wrong layout.
    """

    def __init__(self, key: tuple, layouts: tuple[str, ...], samples: int = PROBE_SAMPLES) -> None:
        self.key = key
        self.layouts = layouts
        self.samples = samples
        self.retries = 0
        self.calls: collections.Counter[int] = collections.Counter()  # timed products per number of rows
        self.seconds: dict[int, dict[str, list[float]]] = {}  # rows -> layout -> its timings at that many rows
        self.started: set[tuple[int, str]] = set()  # (rows, layout) whose first product (building the kernel) ran
        self.rows: int | None = None  # the number of rows whose timings decided
        self.began: float | None = None  # when its first product ran (the epoch's seconds: the file compares them)

    def run(self, forward: FastLinearForward, x: torch.Tensor) -> torch.Tensor:
        weights = min(self.key[-2], TIMED_WEIGHTS)
        if forward.index >= weights:
            return forward.product("plain", x)
        rows = x.numel() // x.shape[-1]
        # the next layout in turn, one step further each pass of the timed weights, so that each weight
        # meets every layout (with as many weights as layouts, a plain turn would give each weight one layout)
        calls = self.calls[rows]
        layout = self.layouts[(calls % weights + calls // weights) % len(self.layouts)]
        self.calls[rows] += 1
        self.began = self.began or time.time()
        forward.make_copy(layout)  # not timed: the copy is made once, the product runs every step
        start = _clock()
        y = forward.product(layout, x)
        elapsed = _clock() - start
        seconds = self.seconds.setdefault(rows, {layout: [] for layout in self.layouts})
        if (rows, layout) in self.started:
            seconds[layout].append(elapsed)
        self.started.add((rows, layout))
        if min(map(len, seconds.values())) >= self.samples:  # (once decided, the group no longer calls the trial)
            plain = statistics.median(seconds["plain"])
            speedups = {layout: plain / statistics.median(times) for layout, times in seconds.items()}
            timed_right = plausible(speedups)
            if not timed_right and self.retries < RETRIES:
                self.retries += 1
                self.seconds = {}
            else:
                self.rows = rows
                earlier = _earlier.pop(self.key, None)
                if earlier is not None:  # earlier processes' trials too
                    _merged.add(self.key)
                if timed_right:  # for good (the file combines them with its own)
                    _speedups[self.key] = speedups if earlier is None else saved_layouts.combined(*earlier, speedups)
                    saved_layouts.save(self.key, speedups, (self.began, time.time()))
                else:  # a stall's timings: for this process only, and only where no earlier trial's are known
                    _speedups[self.key] = speedups if earlier is None else earlier[0]
                    _unsaved.add(self.key)
                for group in list(_live_groups):  # every block's group of this shape, not only the caller's
                    if group.key == self.key[:-1]:
                        group.drop_unused_copies()
        return y

    @property
    def timings(self) -> int:
        """The timings of each layout so far, at the number of rows that has the most."""
        return max((min(map(len, seconds.values())) for seconds in self.seconds.values()), default=0)


def on_trial(rows: int, module: nn.Module | None = None) -> bool:
    """Whether some group's trial (of `module`'s Linears, if given) at this many rows has not decided yet (in this
    process)."""
    measured = rows_measured(rows)
    kinds = None if module is None else {linear_kind(m) for m in module.modules() if isinstance(m, nn.Linear)}
    return any(key[-1] == measured and key not in _speedups and (kinds is None or key[:4] in kinds) for key in _trials)


_clock = time.perf_counter  # what trials time with (a test gives them a clock of its own)


class FastLinearForward:
    """The forward an nn.Linear runs inside `fast_cpu_inference`: its product in the layout its group chose for
    this many rows, on a copy of its weight in that layout (made when first needed, made again if the weight
    changes)."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.state = _weight_state(linear.weight)
        self.source = linear.weight.detach()  # what the copies are of, kept alive: see _weight_state
        self.copies: dict[str, torch.Tensor] = {}  # layout -> the weight in it (not plain: that is the weight)
        self.copyable = True  # oneDNN takes the weight (fast_cpu_inference wraps only such Linears)
        self.group: LinearGroup | None = None  # set by fast_cpu_inference
        self.index = 0  # its place in the group (set there too): a trial times the first few

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if "weight" not in self.linear._parameters:  # parametrized within the block: PyTorch's own forward
            return type(self.linear).forward(self.linear, x)
        weight, bias = self.weight_and_bias()
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias, x)):
            raise RuntimeError(AUTOGRAD_REFUSED)  # the copies' products would drop the gradient silently
        if torch.is_autocast_enabled("cpu"):
            return F.linear(x, weight, bias)  # autocast picks the dtype
        in_features = weight.shape[-1]
        if x.shape[-1:] != (in_features,):
            return F.linear(x, weight, bias)  # its error, whatever the layout
        rows = x.numel() // in_features if in_features else 0  # x (..., in)
        layout = self.group.layout_for(rows)
        if layout == "plain":  # at once: a decode step's dozens of plain products need no more checks
            return F.linear(x, weight, bias)
        state = _weight_state(weight)
        if state != self.state:
            # a weight of another shape or dtype than its group's runs plain: the group's trials are not its own
            same_kind = linear_kind(self.linear) == self.group.key[:-1]
            self.state, self.source, self.copies = state, weight.detach(), {}
            self.copyable = same_kind and can_pack(weight)
        if not self.copyable:
            return F.linear(x, weight, bias)  # oneDNN does not take the weight
        if layout is None:
            return self.group.trial_product(self, x, rows)
        return self.product(layout, x)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # straight from the parameters' dict: nn.Module's attribute lookup would cost a decode step's dozens
        # of products more than this wrapper's other work (an nn.Linear's weight is always a parameter there)
        parameters = self.linear._parameters
        return parameters["weight"], parameters["bias"]

    def make_copy(self, layout: str) -> None:
        """Copy the weight into `layout`, unless that copy is there (plain needs none)."""
        if layout != "plain" and layout not in self.copies:
            weight, _ = self.weight_and_bias()
            if layout == "packed":
                self.copies[layout] = _pack(weight)
            elif layout == "mkl_packed":
                self.copies[layout] = _mkl_pack(weight)
            else:
                self.copies[layout] = weight.detach().t().contiguous()

    def product(self, layout: str, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) times the weight in `layout`, plus the bias: (..., out)."""
        weight, bias = self.weight_and_bias()
        if layout == "plain":
            return F.linear(x, weight, bias)
        self.make_copy(layout)
        if layout == "packed":
            return _packed_forward(self.copies[layout], bias, x)
        if layout == "mkl_packed":
            return _mkl_packed_forward(self.copies[layout], weight, bias, x)
        return _transposed_forward(self.copies[layout], bias, x)

    def keep_only(self, layouts: set[str]) -> None:
        self.copies = {layout: copy for layout, copy in self.copies.items() if layout in layouts}


def whole_number(value: object, name: str) -> int:
    """`value` as an int (a Python, NumPy or 0-d integer tensor's number, 0 or more); else a ValueError naming it."""
    try:
        count = -1 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = -1
    if count < 0:
        raise ValueError(f"{name} must be a whole number (0 or more); got {value!r}")
    return count


@contextlib.contextmanager
def fast_cpu_inference(
    model: nn.Module, layout: str | None = None, long_run: bool = False, passes: int | None = None
) -> Iterator[None]:
    """Within the block, each nn.Linear of `model` that oneDNN can take multiplies by a copy of its weight in
    another layout (packed, transposed, mkl_packed) at the numbers of rows where its group's trial found that
    faster (`layout`: that one of LAYOUTS at every number instead, for comparisons; plain for weights whose
    dtype it does not take), once the passes run at that number would have paid for making the copies;
    `long_run` (a server): at once, as the run will pay.
    `passes`: the most passes of the model the block will run, where the caller knows (`generate`: its new
    tokens; the run may stop sooner): a trial, or a copy, that they cannot repay is not made at all.

    Where oneDNN cannot take the weights (CUDA, MPS, float16, a build without it) the model runs as
    it is; so do parametrized Linears, and every product under torch.autocast. Blocks nest: an inner
    block leaves the Linears an outer one wrapped to the outer one. A weight replaced within the block,
    or changed in place, is copied again, except a change in place that leaves no trace in its version
    counter (a tensor made under torch.inference_mode, or `.data`); one replaced by a weight of another
    shape or dtype (`model.to(torch.bfloat16)`) runs plain PyTorch until the next block. Raises
    RuntimeError for a model autograd would train (grad mode on, parameters requiring grad).
    """
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, or None for the trials' choice")
    passes = None if passes is None else whole_number(passes, "passes (None where it is not known)")
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        raise RuntimeError(AUTOGRAD_REFUSED)
    # a Linear whose forward is already shadowed belongs to an enclosing block (or to someone else)
    # (a parametrized weight is computed at every call: nothing to copy)
    linears = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and "forward" not in vars(m) and not is_parametrized(m) and can_pack(m.weight)
    ]
    try:
        groups: dict[tuple, list[FastLinearForward]] = {}
        for linear in linears:
            linear.forward = FastLinearForward(linear)  # shadows the class's forward
            groups.setdefault(linear_kind(linear), []).append(linear.forward)
        for forwards in groups.values():
            group = LinearGroup(forwards, layout, long_run, passes)
            for index, forward in enumerate(forwards):
                forward.group, forward.index = group, index
        kinds = {(*kind, len(forwards)) for kind, forwards in groups.items()}
        for key, (speedups, trials) in saved_layouts.load().items():  # earlier runs' trials of these groups
            layouts = layouts_for(key[2])
            if sorted(speedups) != sorted(layouts):  # trials of other layouts (a hand-edited file): tried again
                continue
            speedups = {name: speedups[name] for name in layouts}
            if key[:-1] in kinds and key not in _speedups and plausible(speedups):
                if trials >= TRIALS_TO_KEEP:
                    _speedups[key] = speedups
                    _saved.add(key)
                else:
                    _earlier[key] = speedups, trials
        yield
    finally:
        for linear in linears:
            forward = vars(linear).pop("forward", None)
            if isinstance(forward, FastLinearForward):  # its copies go now: the forward and its group refer
                forward.copies, forward.group = {}, None  # to each other, and would wait for the collector


NONE_TRIED = "weight layouts: none tried"  # the words of packing_summary and packing_report alike
NONE_TRIED_BECAUSE = "only float32 weights on a CPU are tried (bfloat16 ones on a CPU with AVX-512)"
NONE_TRIED_SO_SOON = (
    f"a number of rows is tried from its pass {PLAIN_PASSES + 1} on, and no sooner than the run repays it"
)


def packing_report(applied: bool = True) -> list[str]:
    """One line per weight shape and number of rows met in this process: the speed-up and the choice (and where
    it came from), or how far its trial has come; where none was tried (int8 or float16 weights, say), a line
    that says why.
    applied=False: the command ran without the accelerator (--no-fast-cpu), and the one line says so."""
    if not applied:
        return ["off (--no-fast-cpu): every product plain PyTorch"]
    keys = sorted((_speedups.keys() | _trials.keys() | _short) & _met, key=lambda key: (key[-1], key[:2]))
    if not keys:
        return [f"{NONE_TRIED}: {NONE_TRIED_SO_SOON if _met else NONE_TRIED_BECAUSE}"]  # (_met: some were wrapped)
    lines = []
    for key in keys:
        out_features, in_features, dtype, _, count, rows = key
        where = f"{count} x Linear({in_features}, {out_features}, {str(dtype).removeprefix('torch.')}), " + (
            f"{rows}{'+' if rows == PROBE_ROWS else ''} rows"
        )
        if key in _speedups:
            faster = ", ".join(
                f"{layout} {speedup:.2f}x" for layout, speedup in _speedups[key].items() if layout != "plain"
            )
            layout = chosen(_speedups[key])
            unused = (
                "; not used: the passes run would not have paid for its copies"
                if layout != "plain" and key not in _used
                else ""
            )
            lines.append(f"{where}: {faster} plain -> {layout}{decided_by(key)}{unused}")
        elif key in _trials:
            lines.append(f"{where}: on trial ({_trials[key].timings} of {_trials[key].samples} timings each so far)")
        else:
            lines.append(f"{where}: not tried (the run was too short to repay a trial) -> plain")
    if (_saved | _merged) & _met:
        lines.append(f"earlier runs' trials are kept in {saved_layouts.path()} (delete it to measure again)")
    return lines


def decided_by(key: tuple) -> str:
    """Where a decision came from, as packing_report marks it ("" for this run's own trial, kept)."""
    if key in _saved:
        return " (earlier runs' trials)"
    if key in _unsaved:  # (before _merged: a later run does not find this run's trial, and tries again)
        earlier = "; an earlier run's trial decides" if key in _merged else ""
        return f" (this run's timings implausible: not kept for later runs{earlier})"
    if key in _merged:
        return " (this run's and an earlier run's trials)"
    return ""


def packing_summary() -> str:
    """The choices in this process, per number of rows, in a few words (for a start-up line): how many weight
    shapes run in a layout other than plain of those tried, and how many are still on trial."""
    met = (_speedups.keys() | _trials.keys()) & _met
    tried = collections.Counter(key[-1] for key in met)
    faster = collections.Counter(key[-1] for key in met & _speedups.keys() if chosen(_speedups[key]) != "plain")
    pending = collections.Counter(key[-1] for key in met - _speedups.keys())
    if not tried:
        return NONE_TRIED
    parts = [
        f"{rows}{'+' if rows == PROBE_ROWS else ''}: {faster[rows]}/{tried[rows]}"
        + (f" ({pending[rows]} on trial)" if pending[rows] else "")
        for rows in sorted(tried)
    ]
    saved = len(_saved & met)
    earlier = f" ({saved} decided by earlier runs, kept in {saved_layouts.path()})" if saved else ""
    return "weight shapes in faster layouts at rows " + ", ".join(parts) + earlier
