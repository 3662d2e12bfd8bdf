"""The batching engine alone (no HTTP): 1, 4 and 16 concurrent requests against `generate` on the same model.

Each round, `generate` runs one prompt on the main thread, then for each number of clients that many
requests are submitted to a `BatchEngine` at once (16-token prompts, 128 new tokens each, greedy, or with
`--sample` at `generate`'s defaults and a seed per request; <|endoftext|> ignored so every request runs
its full length), and the time each token reaches its listener is noted. The engine runs on the main thread, as the `serve` command runs it (the clients
submit from another); for contrast, one client also goes to an engine on a thread of its own
(`BatchEngine.start`), which a process whose main thread has run the model runs at futex speed
(batching.py says why). Everything runs inside `fast_cpu_inference` as the commands apply it (each
weight in the layout its trial found fastest). Reported per number of clients, pooled over the rounds:
aggregate tokens/s (all tokens / time from the submissions to the last token; median of the rounds),
time to first token and time between tokens (p50, p99).
Goals (issue 24): one client >= 0.95x `generate`; 16 clients' aggregate >= 6x one client's;
p99 time between tokens at 16 clients <= 5x one client's.

`--compare-packing` instead times `generate` at batch 1 and 8 with every product plain, every product
packed, every product transposed, and as the trials chose, alternating (their choices are printed).

    python benchmarks/bench_batching.py                   # 6 layers x 384, float32
    python benchmarks/bench_batching.py --layers 12 --d-model 768 --heads 12 --rounds 2
    python benchmarks/bench_batching.py --compare-packing --layers 12 --d-model 768 --heads 12
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import threading
import time
from collections.abc import Callable

import torch
from machine import describe_machine  # benchmarks/machine.py, beside this script

from examplegpt import GPT, GPTConfig
from examplegpt.batching import BatchEngine, SamplingParams, TokenEvent
from examplegpt.cpu_inference import LAYOUTS, PLAIN_PASSES, fast_cpu_inference, packing_report
from examplegpt.generate import generate
from examplegpt.reproducibility import pin_cpu_arithmetic

GREEDY = {"temperature": 0.0}
SAMPLED = {"temperature": 0.8, "top_p": 0.9}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_clients(
    engine: BatchEngine, prompts: list[list[int]], new_tokens: int, settings: dict
) -> tuple[float, list, list]:
    """Submit every prompt at once (request i seeded with i when sampling); (seconds to the last token, times to
    first token, times between tokens)."""
    times: list[list[float]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def listener(i: int):
        def on_event(event: TokenEvent) -> None:
            times[i].append(time.perf_counter())
            if event.finish_reason is not None:
                done.release()

        return on_event

    seeded = settings["temperature"] > 0
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=new_tokens, stop_at_eos=False, seed=i if seeded else None, **settings)
        engine.submit(prompt, params, listener(i))
    for _ in prompts:
        assert done.acquire(timeout=600), "a request did not finish"
    assert all(len(t) == new_tokens for t in times)
    first = [t[0] - start for t in times]
    between = [b - a for t in times for a, b in zip(t, t[1:])]
    return max(t[-1] for t in times) - start, first, between


def on_main_thread(engine: BatchEngine, clients: Callable[[BatchEngine], None]) -> None:
    """Run the engine on this (main) thread, as `serve` does, while `clients(engine)` submits from another."""
    engine.run_beside(lambda: clients(engine))


def on_own_thread(engine: BatchEngine, clients: Callable[[BatchEngine], None]) -> None:
    """Run the engine on a thread of its own (`start`); the thread ends, and its OpenMP pool with it."""
    engine.start()
    try:
        clients(engine)
    finally:
        engine.shutdown()
        engine.join()


def generate_rate(model: GPT, prompt: torch.Tensor, n: int, settings: dict = GREEDY) -> float:
    start = time.perf_counter()
    generate(model, prompt, n, **settings).tolist()  # .tolist(): waits for a GPU to finish
    return n * prompt.shape[0] / (time.perf_counter() - start)


def compare_packing(model: GPT, prompt_tokens: int, rounds: int, new_tokens: int) -> None:
    """Print generate's tokens/s at batch 1 and 8: every product in each layout (plain, packed, transposed, mkl_packed),
    and as the trials chose; median of `rounds` alternating rounds. The trials' choice starts from the decisions
    earlier runs saved on this machine (examplegpt/saved_layouts.py), as a command does; with
    EXAMPLEGPT_LAYOUT_CACHE= (empty) its trials run afresh. Its copies are made once chosen (long_run, as
    `serve` makes them), where a short `generate` command waits until they would have paid for themselves."""
    gen = torch.Generator().manual_seed(0)
    modes = {"plain": contextlib.nullcontext}  # PyTorch as it is, outside the block
    modes |= {layout: functools.partial(fast_cpu_inference, model, layout) for layout in LAYOUTS if layout != "plain"}
    modes["probed"] = functools.partial(fast_cpu_inference, model, long_run=True)  # the choice, not the wait
    rates: dict[tuple[int, str], list[float]] = {}
    for batch in (1, 8):
        prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=gen)
        for block in modes.values():
            with block():
                generate(model, prompt, 4, temperature=0)  # makes the copies, starts the trials, builds the kernels
        for _ in range(rounds):
            for mode, block in modes.items():
                with block():
                    # untimed: each block makes its copies anew, after a size's first PLAIN_PASSES (which run plain)
                    generate(model, prompt, PLAIN_PASSES + 2, temperature=0)
                    rates.setdefault((batch, mode), []).append(generate_rate(model, prompt, new_tokens))
    print(f"\n`generate` tokens/s (all rows), median of {rounds} alternating rounds:")
    print("| batch | " + " | ".join(modes) + " | " + " | ".join(f"{m} / plain" for m in modes if m != "plain") + " |")
    print("|---:" * (2 * len(modes)) + "|")
    for batch in (1, 8):
        rate = {mode: statistics.median(rates[batch, mode]) for mode in modes}
        ratios = [f"{rate[m] / rate['plain']:.2f}" for m in modes if m != "plain"]
        print(f"| {batch} | " + " | ".join(f"{r:,.1f}" for r in rate.values()) + " | " + " | ".join(ratios) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="cpu or cuda (packed weights are for CPU only)"
    )
    parser.add_argument(
        "--compare-packing", action="store_true", help="each weight layout vs the trials' choice, at batch 1 and 8"
    )
    parser.add_argument("--sample", action="store_true", help="temperature 0.8, top-p 0.9 (generate's defaults)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA GPU")

    pin_cpu_arithmetic()  # as every command does, before the first product
    torch.manual_seed(0)
    config = GPTConfig(d_model=args.d_model, num_heads=args.heads, num_layers=args.layers, d_ff=4 * args.d_model)
    device = torch.device(args.device)
    model = GPT(config).eval().requires_grad_(False).to(device)
    print(describe_machine(device))
    print(f"GPT-2 {args.layers} layers x {args.d_model}, {args.prompt_tokens}-token prompts, {args.new_tokens} new "
          f"tokens each, {'sampled at ' + str(SAMPLED) if args.sample else 'greedy'}, {device}, float32, "
          f"prefill chunk {args.prefill_chunk}")  # fmt: skip
    if args.compare_packing:
        compare_packing(model, args.prompt_tokens, args.rounds, args.new_tokens)
        print("the trials' choices:\n  " + "\n  ".join(packing_report()))
        return

    gen = torch.Generator().manual_seed(0)
    n = args.new_tokens
    settings = SAMPLED if args.sample else GREEDY
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=gen).to(device)
    rates: dict[object, list[float]] = {}
    firsts: dict[int, list[float]] = {c: [] for c in args.clients}
    betweens: dict[int, list[float]] = {c: [] for c in args.clients}

    def engine_of() -> BatchEngine:
        return BatchEngine(model, max_batch=max(args.clients), max_queue=0, prefill_chunk=args.prefill_chunk)

    def every_number_of_clients(engine: BatchEngine) -> None:
        for clients in args.clients:
            seconds, first, between = run_clients(engine, prompts[clients], n, settings)
            rates.setdefault(clients, []).append(clients * n / seconds)
            firsts[clients] += first
            betweens[clients] += between

    def one_client(engine: BatchEngine) -> None:
        seconds, _, _ = run_clients(engine, prompts[1], n, settings)
        rates.setdefault("own thread", []).append(n / seconds)

    with fast_cpu_inference(model, long_run=True):  # as `serve` applies it (off CPU it leaves the model as it is)
        warm = engine_of()
        warm.warm_up()  # the probe and the kernels for every size, on this thread, as `serve` does
        generate(model, prompt, 4, temperature=0)
        for _ in range(args.rounds):
            prompts = {c: torch.randint(0, config.vocab_size, (c, args.prompt_tokens), generator=gen).tolist()
                       for c in set(args.clients) | {1}}  # fmt: skip
            rates.setdefault("generate", []).append(generate_rate(model, prompt, n, settings))
            on_main_thread(engine_of(), every_number_of_clients)
            on_own_thread(engine_of(), one_client)

    single = statistics.median(rates[args.clients[0]])
    generate_tps = statistics.median(rates["generate"])
    own_thread = statistics.median(rates["own thread"])
    base_gap = percentile(betweens[args.clients[0]], 99)
    print(f"`generate`, one prompt, main thread: {generate_tps:,.1f} tokens/s")
    print(f"engine, one client: on the main thread (as `serve` runs it) {single:,.1f} tokens/s = "
          f"{single / generate_tps:.2f}x generate (goal >= 0.95); on a thread of its own {own_thread:,.1f} = "
          f"{own_thread / generate_tps:.2f}x")  # fmt: skip
    print("engine on the main thread:")
    print(
        "| clients | aggregate tokens/s | x one client | first token p50 / p99 (ms) | between tokens p50 / p99 (ms) |"
    )
    print("|---:|---:|---:|---:|---:|")
    for clients in args.clients:
        rate = statistics.median(rates[clients])
        f, b = firsts[clients], betweens[clients]
        print(f"| {clients} | {rate:,.1f} | {rate / single:.2f}x | {percentile(f, 50) * 1e3:.1f} / "
              f"{percentile(f, 99) * 1e3:.1f} | {percentile(b, 50) * 1e3:.1f} / {percentile(b, 99) * 1e3:.1f} |")  # fmt: skip
    print(f"one client / generate: {single / generate_tps:.2f}")
    if len(args.clients) > 1:
        last = args.clients[-1]
        print(f"{last} clients / one: {statistics.median(rates[last]) / single:.2f}x aggregate (goal >= 6); "
              f"p99 between tokens {percentile(betweens[last], 99) / base_gap:.2f}x one client's (goal <= 5)")  # fmt: skip
    print("weight layouts:", "; ".join(packing_report()) or "none (no oneDNN)")


if __name__ == "__main__":
    main()
