"""The batching engine alone (no HTTP): 1, 4 and 16 concurrent requests against `generate` on the same model.

Each round, `generate` runs one prompt, then for each number of clients that many requests are
submitted to one `BatchEngine` at once (16-token prompts, 128 new tokens each, greedy, <|endoftext|>
ignored so every request runs its full length), and the time each token reaches its listener is noted.
Reported per number of clients, pooled over the rounds: aggregate tokens/s (all tokens / time from the
submissions to the last token; median of the rounds), time to first token and time between tokens
(p50, p99). On CPU the engine's runs are inside `fast_cpu_inference` (packed weights), as `generate` is.
Goals (issue 15): one client within 15% of `generate`; 16 clients' aggregate >= 4x one client's;
p99 time between tokens at 16 clients < 5x one client's.

    python benchmarks/bench_batching.py                   # 6 layers x 384, float32
    python benchmarks/bench_batching.py --layers 12 --d-model 768 --heads 12 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from examplegpt import GPT, GPTConfig
from examplegpt.batching import BatchEngine, SamplingParams, TokenEvent
from examplegpt.cpu_inference import fast_cpu_inference
from examplegpt.generate import generate


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_clients(engine: BatchEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list, list]:
    """Submit every prompt at once; (seconds to the last token, times to first token, times between tokens)."""
    times: list[list[float]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def listener(i: int):
        def on_event(event: TokenEvent) -> None:
            times[i].append(time.perf_counter())
            if event.finish_reason is not None:
                done.release()

        return on_event

    params = SamplingParams(max_tokens=new_tokens, temperature=0, stop_at_eos=False)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.submit(prompt, params, listener(i))
    for _ in prompts:
        assert done.acquire(timeout=600), "a request did not finish"
    assert all(len(t) == new_tokens for t in times)
    first = [t[0] - start for t in times]
    between = [b - a for t in times for a, b in zip(t, t[1:])]
    return max(t[-1] for t in times) - start, first, between


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
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPTConfig(d_model=args.d_model, num_heads=args.heads, num_layers=args.layers, d_ff=4 * args.d_model)
    model = GPT(config).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    n = args.new_tokens
    engine = BatchEngine(model, max_batch=max(args.clients), max_queue=0, prefill_chunk=args.prefill_chunk)
    rates: dict[str, list[float]] = {"generate": []}
    firsts: dict[int, list[float]] = {c: [] for c in args.clients}
    betweens: dict[int, list[float]] = {c: [] for c in args.clients}
    print(f"GPT-2 {args.layers} layers x {args.d_model}, {args.prompt_tokens}-token prompts, {n} new tokens each, "
          f"greedy, cpu, float32, prefill chunk {args.prefill_chunk}, torch {torch.__version__}")  # fmt: skip
    engine.start()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=gen)
    generate(model, prompt, 4, temperature=0)  # packs the weights once (kept while they do not change)
    for _ in range(args.rounds):
        start = time.perf_counter()
        generate(model, prompt, n, temperature=0)  # applies fast_cpu_inference itself
        rates["generate"].append(n / (time.perf_counter() - start))
        with fast_cpu_inference(model):
            for clients in args.clients:
                prompts = torch.randint(0, config.vocab_size, (clients, args.prompt_tokens), generator=gen).tolist()
                seconds, first, between = run_clients(engine, prompts, n)
                rates.setdefault(clients, []).append(clients * n / seconds)
                firsts[clients] += first
                betweens[clients] += between
    engine.shutdown()
    engine.join()

    single = statistics.median(rates[args.clients[0]])
    base_gap = percentile(betweens[args.clients[0]], 99)
    print(f"`generate`, one prompt: {statistics.median(rates['generate']):,.0f} tokens/s")
    print(
        "| clients | aggregate tokens/s | x one client | first token p50 / p99 (ms) | between tokens p50 / p99 (ms) |"
    )
    print("|---:|---:|---:|---:|---:|")
    for clients in args.clients:
        rate = statistics.median(rates[clients])
        f, b = firsts[clients], betweens[clients]
        print(f"| {clients} | {rate:,.0f} | {rate / single:.2f}x | {percentile(f, 50) * 1e3:.1f} / "
              f"{percentile(f, 99) * 1e3:.1f} | {percentile(b, 50) * 1e3:.1f} / {percentile(b, 99) * 1e3:.1f} |")  # fmt: skip
    generate_rate = statistics.median(rates["generate"])
    print(f"one client / generate: {single / generate_rate:.2f}")
    if len(args.clients) > 1:
        last = args.clients[-1]
        print(f"{last} clients / one: {statistics.median(rates[last]) / single:.2f}x aggregate; "
              f"p99 between tokens {percentile(betweens[last], 99) / base_gap:.2f}x one client's")  # fmt: skip


if __name__ == "__main__":
    main()
