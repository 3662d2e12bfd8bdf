"""Issue 24 on another machine in under a minute: main thread vs worker thread, packed vs plain weights.

Part 1 (6 layers x 384, greedy, the commands' packing): `generate` on the main thread, on a new thread
while the main thread's OpenMP pool exists, on the main thread while that thread's pool exists, and the
batching engine run as `serve` runs it (`run_beside`: on the main thread) and on a thread of its own
(`start`). Each with tokens/s and how often a thread of the process went to sleep per token (voluntary
context switches, from /proc): GNU libgomp, PyTorch's OpenMP runtime on Linux, spins between parallel
ops, but makes every thread sleep instead once its pools hold more threads than there are CPUs (here:
two pools of the torch thread count each, less one). Sleeping at every op is the slow path.

Part 2 (GPT-2 124M's shape, then 6 x 384): `generate` at batch 1 and 8 with every product in each weight
layout (plain, packed, transposed, mkl_packed) and as the trials chose (bench_batching.py's comparison); then the
trials' choices. The trials start from the decisions earlier runs saved on this machine
(examplegpt/saved_layouts.py); `EXAMPLEGPT_LAYOUT_CACHE= python benchmarks/check_cpu_threads.py` runs them afresh.

    python benchmarks/check_cpu_threads.py            # about 20-50 s on a 16-core machine
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time

import torch
from bench_batching import compare_packing  # beside this script
from machine import describe_machine  # benchmarks/machine.py, beside this script

from examplegpt import GPT, GPTConfig
from examplegpt.batching import BatchEngine, SamplingParams
from examplegpt.cpu_inference import fast_cpu_inference, packing_report
from examplegpt.generate import generate
from examplegpt.reproducibility import pin_cpu_arithmetic

DEADLINE_S = 55  # parts that would start after this are skipped
START = time.perf_counter()


def sleeps() -> int:
    """Voluntary context switches of every live thread of this process so far."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/status") as status:
            total += sum(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt_switches"))
    return total


def model_of(layers: int, d_model: int) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(num_layers=layers, d_model=d_model, num_heads=d_model // 64, d_ff=4 * d_model)
    return GPT(config).eval().requires_grad_(False)


def timed_generate(model: GPT, prompt: torch.Tensor, n: int) -> tuple[float, float]:
    """(tokens/s, sleeps per token) of one `generate` call."""
    before, start = sleeps(), time.perf_counter()
    generate(model, prompt, n, temperature=0)
    seconds = time.perf_counter() - start
    return n * prompt.shape[0] / seconds, (sleeps() - before) / n


def timed_engine(model: GPT, prompt: list[int], n: int, own_thread: bool) -> tuple[float, float]:
    engine, done, result = BatchEngine(model, max_batch=4), threading.Event(), []

    def client() -> None:
        before, start = sleeps(), time.perf_counter()
        engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0, stop_at_eos=False),
                      lambda event: event.finish_reason and done.set())  # fmt: skip
        done.wait()
        result.append((n / (time.perf_counter() - start), (sleeps() - before) / n))

    if own_thread:
        engine.start()
        client()
        engine.shutdown()
        engine.join()
    else:
        engine.run_beside(client)
    return result[0]


def on_new_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()  # the thread ends, and its OpenMP pool with it
    return out[0]


def threads_part(rounds: int, n: int) -> None:
    model = model_of(6, 384)
    prompt = torch.randint(0, 50257, (1, 16))
    cases = {
        "generate, main thread": lambda: timed_generate(model, prompt, n),
        "generate, new thread": lambda: on_new_thread(lambda: timed_generate(model, prompt, n)),
        "engine, main thread (serve)": lambda: timed_engine(model, prompt[0].tolist(), n, own_thread=False),
        "engine, own thread (start)": lambda: timed_engine(model, prompt[0].tolist(), n, own_thread=True),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    with fast_cpu_inference(model, long_run=True):  # as `serve` applies it
        BatchEngine(model, max_batch=4).warm_up()  # the probe, for every size the engine takes
        for _ in range(rounds):
            for name, case in cases.items():
                results[name].append(case())
        # the main thread while another thread's pool is alive: the sleeping path is process-wide
        parked, release = threading.Event(), threading.Event()

        def hold_a_pool() -> None:
            generate(model, prompt, 2, temperature=0)
            parked.set()
            release.wait()

        holder = threading.Thread(target=hold_a_pool)
        holder.start()
        parked.wait()
        results["generate, main thread, another thread's pool alive"] = [timed_generate(model, prompt, n)]
        release.set()
        holder.join()
    base = statistics.median(r for r, _ in results["generate, main thread"])
    print(f"\n6 layers x 384, batch 1, {n} tokens, median of {rounds} alternating rounds")
    print("| case | tokens/s | x generate on the main thread | thread sleeps per token |")
    print("|---|---:|---:|---:|")
    for name, values in results.items():
        rate = statistics.median(r for r, _ in values)
        print(f"| {name} | {rate:,.1f} | {rate / base:.2f} | {statistics.median(s for _, s in values):.1f} |")


def packing_part(layers: int, d_model: int, rounds: int, n: int) -> None:
    print(f"\n{layers} layers x {d_model}, {n} tokens:", end="")
    compare_packing(model_of(layers, d_model), 16, rounds, n)


def main() -> None:
    pin_cpu_arithmetic()  # as every command does, before the first product
    cpus = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    print(describe_machine())
    print(f"CPUs available {cpus}, torch threads {threads}: two OpenMP pools hold {2 * threads - 1} threads, "
          f"{'more' if 2 * threads - 1 > cpus else 'not more'} than the CPUs "
          f"(libgomp {'will' if 2 * threads - 1 > cpus else 'will not'} sleep between ops once two threads ran torch)")  # fmt: skip
    threads_part(rounds=3, n=48)
    for layers, d_model, n in ((12, 768, 24), (6, 384, 48)):
        if time.perf_counter() - START > DEADLINE_S:
            print(f"\n(skipped {layers} x {d_model}: past {DEADLINE_S} s)")
            continue
        packing_part(layers, d_model, rounds=3, n=n)
    print("\nthe trials' choices:\n  " + "\n  ".join(packing_report()))
    print(f"\n{time.perf_counter() - START:.0f} s in all")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
