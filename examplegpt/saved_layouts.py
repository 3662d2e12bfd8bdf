"""The weight-layout trials' decisions kept on disk, so that a later command on the same machine runs none.

A trial (`cpu_inference.Trial`) copies weights into every layout it times; for a short command on a
large model that costs more than the faster layout saves (GPT-2 124M on a Xeon: 0.2 s of copies for a
5% faster token, BENCHMARKS.md). So each decision is written to a JSON file, under a key for the machine
(CPU model, its kernel flags, CPU count, PyTorch build, thread count), and a later process on the same
machine starts from the decisions there. Delete the file to measure again.

The file is `$EXAMPLEGPT_LAYOUT_CACHE`, or `~/.cache/examplegpt/weight_layouts.json` (under
`$XDG_CACHE_HOME` where set); `EXAMPLEGPT_LAYOUT_CACHE=` (empty) keeps none. A file that cannot be
read is taken as empty, and one that cannot be written leaves the decisions to the process.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from .device import KERNEL_FLAGS, cpu_flags, cpu_model


def path() -> Path | None:
    """Where the decisions are kept; None: nowhere."""
    named = os.environ.get("EXAMPLEGPT_LAYOUT_CACHE")
    if named is not None:
        return Path(named).expanduser() if named else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "examplegpt" / "weight_layouts.json"


def machine() -> str:
    """What a decision holds for: the CPU, PyTorch's build and the threads its products run on."""
    flags = cpu_flags()
    return (
        f"{cpu_model()} | {' '.join(f for f in KERNEL_FLAGS if f in flags) or 'no avx2'} | {os.cpu_count()} cpus "
        f"| torch {torch.__version__} | {torch.get_num_threads()} threads"
    )


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
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def load(layouts: tuple[str, ...]) -> dict[tuple, dict[str, float]]:
    """This machine's decisions: key -> {layout: speed-up over plain}; entries that do not parse are left out."""
    file = path()
    if file is None:
        return {}
    decisions = {}
    mine = read_all(file).get(machine())
    for text, speedups in mine.items() if isinstance(mine, dict) else ():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            if sorted(speedups) == sorted(layouts) and all(float(s) > 0 for s in speedups.values()):
                decisions[key_of(text)] = {layout: float(speedups[layout]) for layout in layouts}
    return decisions


def save(key: tuple, speedups: dict[str, float]) -> None:
    """Add one decision to the file (written whole, then renamed over the old one: a reader never sees half)."""
    file = path()
    if file is None:
        return
    saved = read_all(file)
    mine = saved.get(machine())
    saved[machine()] = (mine if isinstance(mine, dict) else {}) | {key_text(key): speedups}
    partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(saved, indent=1, sort_keys=True))
        os.replace(partial, file)
    except OSError:  # a read-only home: the decision stays with the process
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
