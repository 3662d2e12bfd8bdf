"""The weight-layout trials' decisions kept on disk, so that a later command on the same machine runs none.

A trial (`cpu_inference.Trial`) copies weights into every layout it times; for a short command on a
large model that costs more than the faster layout saves (GPT-2 124M on a Xeon: 0.2 s of copies for a
5% faster token, BENCHMARKS.md). So each decision is written to a JSON file, under a key for the machine
(CPU model, its kernel flags, CPU count, PyTorch build, thread count), and a later process on the same
machine starts from the decisions there. Delete the file to measure again. Each key's record holds how many
processes' trials it has, and each layout's speed-up over them (their geometric mean): a trial timed at a
busy moment can rank a copy faster, or slower, than it is, for every later command
(`cpu_inference.TRIALS_TO_KEEP`).

The file is `$EXAMPLEGPT_LAYOUT_CACHE`, or `~/.cache/examplegpt/weight_layouts.json` (under
`$XDG_CACHE_HOME` where set); `EXAMPLEGPT_LAYOUT_CACHE=` (empty) keeps none. A file that cannot be
read is taken as empty, and one that cannot be written leaves the decisions to the process. A trial
whose timings stayed implausible through its retries decides for its process only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import threading
from pathlib import Path

import torch

from .device import cpu_model, kernel_flags

try:
    import fcntl
except ImportError:  # Windows: no lock, and the last of two processes deciding at once wins
    fcntl = None


# Part of every machine's key: a change to the layouts tried, to what one means, or to how trials measure, makes a
# new one (else an older version sharing the file would replace this one's records with its own, and back).
FORMAT = "layouts v4"
MAX_SPANS = 8  # the latest trials' times a record keeps, to tell a trial that ran beside another


def path() -> Path | None:
    """Where the decisions are kept; None: nowhere (also where there is no home folder to keep them in)."""
    named = os.environ.get("EXAMPLEGPT_LAYOUT_CACHE")
    if named is not None:
        return Path(named).expanduser() if named else None
    xdg = Path(os.environ.get("XDG_CACHE_HOME", ""))
    try:
        cache = xdg if xdg.is_absolute() else Path.home() / ".cache"  # (a relative XDG path is to be ignored)
    except RuntimeError:  # no HOME and no entry in the password file
        return None
    return cache / "examplegpt" / "weight_layouts.json"


def machine() -> str:
    """What a decision holds for: the CPU, PyTorch's build and the threads its products run on."""
    return f"{cpu()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {FORMAT}"


@functools.cache
def cpu() -> str:
    """The CPU's part of `machine`, read from /proc/cpuinfo once a process (a trial's decision is saved mid-pass)."""
    kernels = " ".join(kernel_flags()) or "no avx2"
    return f"{cpu_model()} ({platform.machine()}) | {kernels} | {os.cpu_count()} cpus"


def key_text(key: tuple) -> str:
    """A trial's key (out, in, dtype, bias, weights in the group, rows) as the file writes it."""
    out_features, in_features, dtype, bias, count, rows = key
    return f"{out_features} {in_features} {str(dtype).removeprefix('torch.')} {bias} {count} {rows}"


def key_of(text: str) -> tuple:
    out_features, in_features, dtype, bias, count, rows = text.split()
    if not isinstance(getattr(torch, dtype, None), torch.dtype) or bias not in ("True", "False"):
        raise ValueError(text)
    return int(out_features), int(in_features), getattr(torch, dtype), bias == "True", int(count), int(rows)


def read_all(file: Path) -> dict[str, dict]:
    """Every machine's decisions in the file; {} where it is missing or not what this module writes."""
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return saved if isinstance(saved, dict) else {}


def load() -> dict[tuple, tuple[dict[str, float], int]]:
    """This machine's decisions: key -> ({layout: its speed-up over plain over the trials}, the number of
    trials); entries that do not parse are left out (the caller keeps those that tried the layouts it tries)."""
    file = path()
    if file is None:
        return {}
    decisions = {}
    mine = read_all(file).get(machine())
    for text, record in mine.items() if isinstance(mine, dict) else ():
        with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError, OverflowError):
            speedups, trials = record["speedups"], int(record["trials"])
            if "plain" in speedups and all(float(s) > 0 for s in speedups.values()) and trials > 0:
                decisions[key_of(text)] = ({str(layout): float(s) for layout, s in speedups.items()}, trials)
    return decisions


def combined(earlier: dict[str, float], trials: int, speedups: dict[str, float]) -> dict[str, float]:
    """Each layout's speed-up over `trials` earlier trials and one more: the geometric mean of them all (a
    speed-up and its inverse weigh alike)."""
    return {k: math.exp((trials * math.log(earlier[k]) + math.log(s)) / (trials + 1)) for k, s in speedups.items()}


def merged(record: object, speedups: dict[str, float], span: tuple[float, float] | None = None) -> dict:
    """A key's record with one more trial's speed-ups, `combined`, and the count of trials (a record that does
    not parse counts for nothing). `span`: when the trial ran (seconds since the epoch); one that overlaps an
    earlier trial's does not add to the count: two commands started together timed each other's load."""
    spans = [] if span is None else [list(span)]
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError, OverflowError):
        earlier, trials = {k: float(v) for k, v in record["speedups"].items()}, int(record["trials"])
        if sorted(earlier) == sorted(speedups) and trials > 0 and all(v > 0 for v in earlier.values()):
            before = [(float(start), float(end)) for start, end in record.get("spans", [])]
            overlaps = span is not None and any(start < span[1] and span[0] < end for start, end in before)
            return {
                "speedups": combined(earlier, trials, speedups),
                "trials": trials + (0 if overlaps else 1),
                "spans": ([list(s) for s in before] + spans)[-MAX_SPANS:],
            }
    return {"speedups": speedups, "trials": 1, "spans": spans}


def save(key: tuple, speedups: dict[str, float], span: tuple[float, float] | None = None) -> None:
    """Add one trial's speed-ups to the file (`merged` into its key's record): read, merged and written whole
    under a lock (processes that decide at once keep each other's trials), then renamed over the old file (a
    reader never sees half of one)."""
    file = path()
    if file is None:
        return
    partial = file.with_name(f"{file.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file.with_name(file.name + ".lock"), "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            saved, here = read_all(file), machine()
            mine = saved.get(here) if isinstance(saved.get(here), dict) else {}
            saved[here] = mine | {key_text(key): merged(mine.get(key_text(key)), speedups, span)}
            partial.write_text(json.dumps(saved, indent=1, sort_keys=True))
            os.replace(partial, file)
    except OSError:  # a read-only home: the decision stays with the process
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
