"""Issue 19's drill on any machine: the same training in fresh processes, straight and killed + resumed.

Runs the command issue 19 reported (the tiny preset on the bundled Tiny Shakespeare, batch 8 x 128,
40 steps, a checkpoint every 20) `--straight` times uninterrupted and `--killed` times killed with
SIGKILL once its step-20 checkpoint exists and resumed with `--resume auto`; every run is a fresh
process pinned to its own `--cores-per-run` CPUs with that many threads (2, as on the issue's 2-core
machine), `--parallel` runs at a time on disjoint CPUs. Prints, and writes as JSON, each run's final
weight hash and losses: one hash over all runs is the promise.

    python benchmarks/check_resume.py --straight 6 --killed 10 --parallel 6 --out /tmp/resume.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import child_process_env, describe_machine  # benchmarks/machine.py, beside this script

STEPS, CHECKPOINT_EVERY = 40, 20
TRAIN_ARGS = [
    "train", "--preset", "tiny", "--data", "shakespeare", "--max-steps", str(STEPS), "--batch-size", "8",
    "--max-seq-len", "128", "--checkpoint-interval", str(CHECKPOINT_EVERY), "--eval-interval", str(CHECKPOINT_EVERY),
    "--no-amp", "--seed", "1", "--learning-rate", "2e-3", "--warmup-steps", "5", "--device", "cpu",
]  # fmt: skip


def launch(out_dir: Path, cores: list[int], cache: Path, *extra: str) -> subprocess.Popen:
    env = child_process_env(
        OMP_NUM_THREADS=str(len(cores)),
        WANDB_MODE="disabled",
        ADDRESS_SHIFT="x" * (hash(str(out_dir)) % 997),  # moves the stack and what is allocated after it
    )
    args = [*TRAIN_ARGS, "--out-dir", str(out_dir), "--cache-dir", str(cache), *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "examplegpt", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"train exited {proc.returncode}: {err.strip().splitlines()[-1:]}")


def one_run(out_dir: Path, cores: list[int], cache: Path, kill: bool) -> dict:
    proc = launch(out_dir, cores, cache)
    if kill:
        checkpoints = out_dir / "checkpoints"
        while proc.poll() is None and not any(checkpoints.glob("*.pt")):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = launch(out_dir, cores, cache, "--resume", "auto")
    finish(proc)
    return {"kind": "killed+resumed" if kill else "straight", "cores": cores, **summary(out_dir)}


def summary(out_dir: Path) -> dict:
    import torch  # imported late: the parent process only launches and reads

    weights = torch.load(out_dir / "gpt_model.pt", map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()[:16]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    last_train = [r for r in records if "train_loss" in r and r.get("step") == STEPS]
    last_val = [r for r in records if "val_loss" in r and r.get("step") == STEPS]
    return {
        "hash": digest,
        "train_loss": last_train[-1]["train_loss"] if last_train else None,
        "val_loss": last_val[-1]["val_loss"] if last_val else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--straight", type=int, default=6, help="uninterrupted runs")
    parser.add_argument("--killed", type=int, default=10, help="runs killed after their first checkpoint and resumed")
    parser.add_argument("--cores-per-run", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, each on its own CPUs")
    parser.add_argument("--first-core", type=int, default=0, help="leave CPUs below this one free")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    available = sorted(os.sched_getaffinity(0))[args.first_core :]
    slots = [available[i * args.cores_per_run : (i + 1) * args.cores_per_run] for i in range(args.parallel)]
    if any(len(s) < args.cores_per_run for s in slots):
        parser.error(f"{args.parallel} runs of {args.cores_per_run} CPUs need more than the {len(available)} available")
    machine = describe_machine()
    print(machine, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        finish(launch(work / "warm", slots[0], cache, "--max-steps", "1"))  # builds the token cache once
        kinds = [False] * args.straight + [True] * args.killed
        free = list(slots)

        def run(index_kill: tuple[int, bool]) -> dict:
            index, kill = index_kill
            cores = free.pop()
            try:
                return one_run(work / f"run{index}", cores, cache, kill)
            finally:
                free.append(cores)

        with ThreadPoolExecutor(args.parallel) as pool:
            results = []
            for result in pool.map(run, enumerate(kinds)):
                print(f"{result['kind']:>15} on CPUs {result['cores']}: weights {result['hash']}"
                      f"  train loss {result['train_loss']}  val loss {result['val_loss']}", flush=True)  # fmt: skip
                results.append(result)
    hashes = sorted({r["hash"] for r in results})
    verdict = (
        f"{len(results)} runs ({args.straight} straight, {args.killed} killed + resumed): {len(hashes)} weight hash(es)"
    )
    print(verdict)
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "command": TRAIN_ARGS, "verdict": verdict,
                                        "runs": results}, indent=1))  # fmt: skip
    sys.exit(0 if len(hashes) == 1 else 1)


if __name__ == "__main__":
    main()
