"""The server under load: 1, 4 and 16 concurrent streaming clients, against `generate` on the same model.

For each model shape (random weights, saved to a temporary file) the real `examplegpt serve` command is
started in a subprocess; each client sends one streaming request (a 16-token prompt, 128 new tokens,
greedy, <|endoftext|> ignored so every request runs its full length) and notes when each chunk arrives.
Reported per number of clients, pooled over the rounds: aggregate tokens/s (all tokens / wall time from
the first request to the last token, median of the rounds), time to first token and time between tokens
(p50, p99). `generate`'s tokens/s is the `generate` command's own figure (--json) on the same model file,
for the same prompt length and number of tokens (its second prompt, so the one-off weight packing is not
counted), run just before each round of one client: one client / `generate` is the median of each round's
pair, so a shared machine's drift moves both sides of a ratio. The server runs the model on its main
thread, as `generate` does; its start-up line says where packed weights were found faster, and how
many of those decisions an earlier run saved (EXAMPLEGPT_LAYOUT_CACHE= makes its trials run afresh). Goals
(issue 24): one client >= 0.85x `generate`; 16 clients' aggregate >= 6x one client's; p99 time between
tokens at 16 clients <= 5x one client's. For the engine alone, main thread vs a thread of its own: bench_batching.py.

The clients run in this process and, unless --server-cpus keeps them apart, on the cores the server
decodes on; their own CPU time per token is reported, since on a small machine it is taken from the
server's cores. They read the stream with aiohttp, as vLLM's and SGLang's serving benchmarks do: its C
parser spends less CPU per token than httpx's (which the `openai` client uses), so the figures are
the server's more than the client's (on uvloop where installed, as the server; each client opens its
connection with an untimed one-token request, as a client that keeps its connection open has).

    python benchmarks/bench_serve.py                       # 6 layers x 384, then the 124M shape
    python benchmarks/bench_serve.py --shapes 6x384 --clients 1 4 --rounds 1
    taskset -c 4,5,6 python benchmarks/bench_serve.py --shapes 6x384 --threads 2 --server-cpus 4,5  # clients on 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path

import torch
from machine import child_process_env, describe_machine  # benchmarks/machine.py, beside this script

try:
    import aiohttp
except ImportError:
    sys.exit("bench_serve.py reads the streams with aiohttp, which is not installed: pip install -e '.[dev]'")

from examplegpt import GPT, GPTConfig
from examplegpt.weights import save_model_file

SHAPES = {
    "6x384": dict(num_layers=6, d_model=384, num_heads=6, d_ff=1536),
    "124M": dict(),
    "2x64": dict(num_layers=2, d_model=64, num_heads=4, d_ff=256),  # for the suite's run of this script
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def child_env(threads: int | None) -> dict[str, str]:
    return child_process_env() if threads is None else child_process_env(OMP_NUM_THREADS=str(threads))


def at_least_one(text: str) -> int:
    """--clients, --rounds, --threads, the token counts: a whole number of at least 1."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return number


def cpu_list(text: str) -> set[int]:
    """--server-cpus: CPU numbers separated by commas, such as 4,5."""
    try:
        return {int(cpu) for cpu in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CPU numbers separated by commas, such as 4,5; got {text!r}"
        ) from None


def on_cpus(cpus: set[int] | None) -> Callable[[], None] | None:
    """A subprocess's preexec_fn that pins it (and its threads) to `cpus`; None leaves it where this process runs."""
    return None if cpus is None else lambda: os.sched_setaffinity(0, cpus)


def start_server(
    model_file: Path,
    max_batch: int,
    threads: int | None,
    precision: str = "auto",
    device: str = "cpu",
    cpus: set[int] | None = None,
) -> tuple[subprocess.Popen, str]:
    env = child_env(threads)
    command = [sys.executable, "-m", "examplegpt", "serve", "-c", str(model_file), "--port", "0"]
    command += ["--max-batch", str(max_batch), "--device", device, "--precision", precision]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=on_cpus(cpus))
    line = proc.stdout.readline()
    print(f"server: {line.strip()}")  # says where the probe found packed weights faster
    url = next(word for word in line.split() if word.startswith("http://"))
    return proc, url


async def one_client(session: aiohttp.ClientSession, url: str, prompt: list[int], new_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    sent = time.perf_counter()
    arrivals = []
    async with session.post(url + "/v1/completions", json=body, raise_for_status=True) as response:
        async for line in response.content:  # one line of the event stream, b"data: {...}\n" or b"\n"
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                if json.loads(line[6:])["choices"]:
                    arrivals.append(time.perf_counter())
    return {"sent": sent, "arrivals": arrivals}


def client_cpu_seconds() -> float:
    """CPU seconds this process (the clients) has used so far, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def load(url: str, clients: int, prompt_tokens: int, new_tokens: int, seed: int) -> tuple[list[dict], float]:
    """Each client's request and arrivals, and the CPU seconds the clients spent on them. Not counted: making
    the HTTP client and its connections (a one-token request each first), which cost a fresh client tens of
    milliseconds whatever the number of tokens; a client that streams many completions keeps them open."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 50257, (prompt_tokens,), generator=gen).tolist() for _ in range(clients)]
    connections = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connections, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one_client(session, url, p, 1) for p in prompts))
        cpu_before = client_cpu_seconds()
        results = await asyncio.gather(*(one_client(session, url, p, new_tokens) for p in prompts))
        return results, client_cpu_seconds() - cpu_before


def run_clients(clients: Coroutine) -> object:
    """Run the clients on uvloop where it is installed (as the server runs): its loop spends less CPU per
    streamed chunk, CPU that the clients take from the server's cores on a small machine."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(clients)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(clients)


def generate_rate(
    model_file: Path,
    prompt_tokens: int,
    new_tokens: int,
    threads: int | None,
    precision: str = "auto",
    device: str = "cpu",
    cpus: set[int] | None = None,
) -> float:
    """Tokens/s of the `generate` command on this model (its second prompt: the first packs the weights)."""
    prompt = " hello" * prompt_tokens  # `hello` and ` hello` are one token each
    command = [sys.executable, "-m", "examplegpt", "generate", "-c", str(model_file), "--device", device,
               "-n", str(new_tokens), "-t", "0", "--ignore-eos", "--json", "--interactive", "--precision", precision]  # fmt: skip
    out = subprocess.run(
        command, input=f"{prompt}\n{prompt}\n", capture_output=True, text=True, check=True,
        env=child_env(threads), preexec_fn=on_cpus(cpus),
    ).stdout  # fmt: skip
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert records[-1]["tokens"] == new_tokens, records[-1]
    return records[-1]["batch_tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["6x384", "124M"], choices=list(SHAPES))
    parser.add_argument("--clients", type=at_least_one, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt-tokens", type=at_least_one, default=16)
    parser.add_argument("--new-tokens", type=at_least_one, default=128)
    parser.add_argument(
        "--rounds", type=at_least_one, default=3, help="runs per number of clients (odd: the median is one of them)"
    )
    parser.add_argument(
        "--threads", type=at_least_one, help="torch threads of the server and of `generate` (OMP_NUM_THREADS)"
    )
    parser.add_argument(
        "--precision", default="auto", help="--precision of the server and of `generate` (int8, bf16, ...)"
    )
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="--device of the server and of `generate` (cpu, cuda)"
    )
    parser.add_argument(
        "--server-cpus",
        type=cpu_list,
        help="pin the server and `generate` to these CPUs (e.g. 4,5) and the clients to the others this process may use",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA GPU")
    placement = "clients on the server's cores"
    if args.server_cpus is not None:
        allowed = os.sched_getaffinity(0)
        if not args.server_cpus <= allowed:
            parser.error(f"--server-cpus {sorted(args.server_cpus)}: this process may only use CPUs {sorted(allowed)}")
        if not allowed - args.server_cpus:
            parser.error(
                f"--server-cpus {sorted(args.server_cpus)}: no CPU is left for the clients (leave the option out to share)"
            )
        os.sched_setaffinity(0, allowed - args.server_cpus)
        placement = f"server on CPUs {sorted(args.server_cpus)}, clients on {sorted(os.sched_getaffinity(0))}"

    print(describe_machine(torch.device(args.device)))
    print(f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens per client, greedy, streaming, "
          f"server's torch threads {args.threads or 'default'}, precision {args.precision}, {placement}")  # fmt: skip
    for shape in args.shapes:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**SHAPES[shape]))
        with tempfile.TemporaryDirectory() as folder:
            model_file = Path(folder) / f"{shape}.pt"
            save_model_file(model, model_file)
            del model
            proc, url = start_server(
                model_file, max(args.clients), args.threads, args.precision, args.device, args.server_cpus
            )
            try:
                run_clients(load(url, 1, args.prompt_tokens, 4, seed=99))  # warm-up
                rows, baselines = {}, []
                for clients in args.clients:
                    rates, firsts, gaps, cpu = [], [], [], 0.0
                    for r in range(args.rounds):
                        if clients == min(args.clients):  # `generate` just before, for a ratio of neighbours
                            baselines.append(generate_rate(
                                model_file, args.prompt_tokens, args.new_tokens, args.threads, args.precision,
                                args.device, args.server_cpus,
                            ))  # fmt: skip
                        results, seconds = run_clients(load(url, clients, args.prompt_tokens, args.new_tokens, seed=r))
                        cpu += seconds
                        start = min(c["sent"] for c in results)
                        end = max(c["arrivals"][-1] for c in results)
                        rates.append(sum(len(c["arrivals"]) for c in results) / (end - start))
                        firsts += [c["arrivals"][0] - c["sent"] for c in results]
                        gaps += [b - a for c in results for a, b in zip(c["arrivals"], c["arrivals"][1:])]
                    tokens = args.rounds * clients * args.new_tokens
                    rows[clients] = dict(
                        client_cpu=cpu / tokens,
                        rates=rates,
                        rate=statistics.median(rates),
                        ttft=(percentile(firsts, 50), percentile(firsts, 99)),
                        gap=(percentile(gaps, 50), percentile(gaps, 99)),
                    )
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        print(f"\n{shape}: `generate` {statistics.median(baselines):.1f} tokens/s (median of {len(baselines)}: "
              f"{', '.join(f'{rate:.1f}' for rate in baselines)})")  # fmt: skip
        print("| clients | aggregate tokens/s | per client | time to first token p50 / p99 (ms) |"
              " time between tokens p50 / p99 (ms) | clients' CPU per token (ms) |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|")
        for clients, row in rows.items():
            print(f"| {clients} | {row['rate']:.1f} | {row['rate'] / clients:.1f} | "
                  f"{row['ttft'][0] * 1e3:.0f} / {row['ttft'][1] * 1e3:.0f} | "
                  f"{row['gap'][0] * 1e3:.1f} / {row['gap'][1] * 1e3:.1f} | {row['client_cpu'] * 1e3:.2f} |")  # fmt: skip
        first, last = min(rows), max(rows)
        ratios = [rate / baseline for rate, baseline in zip(rows[first]["rates"], baselines)]
        print(f"one client / generate: {statistics.median(ratios):.2f} (goal >= 0.85; by round "
              f"{', '.join(f'{ratio:.2f}' for ratio in ratios)}); "
              f"{last} clients / one: {rows[last]['rate'] / rows[first]['rate']:.2f}x (goal >= 6); "
              f"p99 between tokens, {last} / one: {rows[last]['gap'][1] / rows[first]['gap'][1]:.2f}x (goal <= 5)")  # fmt: skip


if __name__ == "__main__":
    main()
