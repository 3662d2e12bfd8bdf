"""A run's folder (--out-dir): one run writes it at a time, and a resume from an earlier checkpoint never mixes two timelines.

The folder holds checkpoints/, gpt_model.pt, metrics.jsonl and loss.png; `train` claims it for the
whole run with a lock the operating system drops when the process ends, kill -9 included, and a new run
never writes over an earlier run's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path

from .checkpoint import later_checkpoints, list_checkpoints
from .errors import UserError


@contextlib.contextmanager
def claim_out_dir(out_dir: Path):
    """Hold an exclusive lock on out_dir for the run: two runs writing one folder would overwrite each other's
    checkpoints.

    The lock file lives in the run's own checkpoints/ folder and is removed when the run ends; a run
    refused before it wrote anything leaves no folder it created behind."""
    folder = out_dir / "checkpoints"
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = take_lock(folder / ".lock")
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out_dir}: {e.strerror}") from None
    except UserError:
        remove_if_empty(created)
        raise
    finished = False
    try:
        yield
        finished = True
    finally:
        with lock:
            Path(lock.name).unlink(missing_ok=True)  # while still holding it: see take_lock
        if not finished:
            remove_if_empty(created)


def take_lock(path: Path):
    """The open lock file at `path`, locked, with our pid in it; UserError if another run holds it."""
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise UserError(
                f"another training run (pid {holder}) is writing to {path.parent.parent}:"
                " wait for it to end or choose another --out-dir"
            ) from None
        # The run that held it may have removed the file just before we locked it: lock the new one then.
        if path.exists() and os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
            break
        lock.close()
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


# What a run writes in its folder besides checkpoints/ that a new run would overwrite: its weights and its history.
RUN_OUTPUTS = ("gpt_model.pt", "metrics.jsonl")


def refuse_an_earlier_run(out_dir: str | Path) -> None:
    """A new run in out_dir would overwrite an earlier run's files or mix its checkpoints with them: refuse
    (the default out_dir is the current folder, where `generate` looks for gpt_model.pt). Checked while holding
    the folder's claim, so that a folder in use is refused as such."""
    folder = "the current folder (--out-dir .)" if Path(out_dir) == Path(".") else str(out_dir)
    if list_checkpoints(out_dir):  # a later --resume would pick up the run before's checkpoints
        raise UserError(
            f"{folder} already holds a run's checkpoints: continue it with --resume, or start the new run"
            " in another --out-dir"
        )
    outputs = [name for name in RUN_OUTPUTS if (Path(out_dir) / name).exists()]
    if outputs:
        them = "it" if len(outputs) == 1 else "them"
        raise UserError(
            f"{folder} already holds an earlier run's {' and '.join(outputs)} (and no checkpoint to --resume):"
            f" a new run would overwrite {them}; start it in another --out-dir, or move {them} away to start over here"
        )


def set_aside_abandoned_branch(out_dir: Path, position: tuple[int, int]) -> str | None:
    """Resuming from a checkpoint that is not the newest goes back in time: the checkpoints past it (and the
    gpt_model.pt they led to) belong to a branch the user abandoned, and a later `--resume auto` must not pick
    them up. Move them into checkpoints/abandoned-<time>/, with a copy of that branch's metrics.jsonl and
    loss.png (the run cuts its own back to `position`); the one line that says so, or None if there were none."""
    later = later_checkpoints(out_dir, position)
    if not later:
        return None
    folder = out_dir / "checkpoints" / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(2, 1000):  # two go-backs within a second
        if not folder.exists():
            break
        folder = folder.with_name(f"{folder.name.split('.')[0]}.{n}")
    folder.mkdir()
    for checkpoint in later:
        checkpoint.rename(folder / checkpoint.name)
    moved = [f"{len(later)} later checkpoint{'s' if len(later) > 1 else ''}"]
    if (out_dir / "gpt_model.pt").exists():
        (out_dir / "gpt_model.pt").rename(folder / "gpt_model.pt")
        moved.append("gpt_model.pt")
    for name in ("metrics.jsonl", "loss.png"):
        if (out_dir / name).exists():
            shutil.copy2(out_dir / name, folder / name)
    return f"resuming from an earlier checkpoint: moved the abandoned branch's {' and '.join(moved)} to {folder}"
