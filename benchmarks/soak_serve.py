"""Soak `examplegpt serve`: many concurrent clients for a while, some leaving mid-stream, some sending bad requests.

Starts the real command on a tiny random model (on a free localhost port), then runs `--clients`
asyncio clients for `--seconds`. Each client loops over requests: streamed or not, and by chance
(a fifth) a stream it leaves after a few events, or (a tenth) a request the server must refuse.
Passes (exit 0) when:
  - every request the server admitted got its final event (a finish_reason, then [DONE] for a stream);
  - no answer was a 5xx, and every bad request got a 400 error object;
  - /health's running and queued counts return to zero once the clients stop;
  - the server's resident memory at the end is within 10% of where it settled after the warm-up
    (the first third of the run).
Every loop is bounded in count and time; traffic goes to 127.0.0.1 only.

    python benchmarks/soak_serve.py                        # 64 clients, 2 minutes
    python benchmarks/soak_serve.py --clients 16 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from examplegpt import GPT, GPTConfig  # noqa: E402
from examplegpt.weights import save_model_file  # noqa: E402

REQUEST_TIMEOUT = 120  # seconds one request may take, at most
BAD_BODIES = [
    {"prompt": "x", "temperature": -1},
    {"prompt": "x", "top_p": -0.5},
    {"prompt": "x", "max_tokens": 0},
    {"prompt": [1, 50257]},
    {"prompt": "x", "colour": "red"},
    {"prompt": "x", "echo": True},
    "{not json",
]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def mib(size: int) -> float:
    return round(size / 2**20, 1)


def start_server(model_file: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "examplegpt", "serve", "-c", str(model_file), "--port", "0", *flags]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT ..." once it listens
    if not line:
        raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")
    url = next(word for word in line.split() if word.startswith("http://"))
    return proc, url.rstrip("/")


class Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        self.counts["problems"] += 1
        if len(self.problems) < 20:
            self.problems.append(text)


async def streamed(client: httpx.AsyncClient, body: dict, leave_after: int | None, tally: Tally) -> None:
    """A streamed request; `leave_after` events, then the connection is closed (a client that left)."""
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            tally.problem(f"stream answered {response.status_code}: {(await response.aread())[:200]!r}")
            return
        tally.counts["admitted"] += 1
        events, finished, done = 0, False, False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                tally.problem(f"error event: {data[:200]}")
            finished = finished or any(c["finish_reason"] is not None for c in event.get("choices", []))
            events += 1
            if leave_after is not None and events >= leave_after:
                tally.counts["left mid-stream"] += 1
                return  # leaving the block closes the connection
        if finished and done:
            tally.counts["final event"] += 1
        else:
            tally.problem(f"a stream ended without its final event ({events} events, [DONE] {done})")


async def answered(client: httpx.AsyncClient, body: dict, tally: Tally) -> None:
    response = await client.post("/v1/completions", json=body)
    if response.status_code != 200:
        tally.problem(f"answered {response.status_code}: {response.text[:200]}")
        return
    tally.counts["admitted"] += 1
    if all(c["finish_reason"] in ("stop", "length") for c in response.json()["choices"]):
        tally.counts["final event"] += 1
    else:
        tally.problem(f"no finish_reason: {response.text[:200]}")


async def refused(client: httpx.AsyncClient, body: dict | str, tally: Tally) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = await client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    if response.status_code == 400 and set(response.json().get("error", {})) == {"message", "type", "param", "code"}:
        tally.counts["bad request refused"] += 1
    else:
        tally.problem(f"a bad request got {response.status_code}: {response.text[:200]}")


async def one_client(url: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as client:
        while time.monotonic() < deadline:
            body = {"prompt": rng.choice(["The", "Once upon a time", "In 1901 the city"]), "temperature": rng.choice([0, 0.8]),
                    "max_tokens": rng.randint(1, 64), "ignore_eos": True}  # fmt: skip
            kind = rng.random()
            tally.counts["requests"] += 1
            try:
                if kind < 0.2:
                    await streamed(client, {**body, "stream": True, "max_tokens": 200}, rng.randint(1, 3), tally)
                elif kind < 0.3:
                    await refused(client, rng.choice(BAD_BODIES), tally)
                elif kind < 0.65:
                    await streamed(client, {**body, "stream": True}, None, tally)
                else:
                    await answered(client, body, tally)
            except httpx.HTTPError as e:
                tally.problem(f"{type(e).__name__}: {e}")


async def soak(url: str, pid: int, clients: int, seconds: float) -> dict:
    tally = Tally()
    start = time.monotonic()
    deadline = start + seconds
    tasks = [asyncio.create_task(one_client(url, seed, deadline, tally)) for seed in range(clients)]
    samples = []  # (seconds since start, RSS)
    while not all(t.done() for t in tasks):
        samples.append((time.monotonic() - start, rss_bytes(pid)))
        await asyncio.wait(tasks, timeout=1.0)
    await asyncio.gather(*tasks)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(300):  # up to 30 s for the freed rows to show
            health = (await client.get("/health")).json()
            if health["running"] == 0 and health["queued"] == 0:
                break
            await asyncio.sleep(0.1)
    settled = next(rss for at, rss in samples if at >= seconds / 3)
    end = rss_bytes(pid)
    return {"tally": tally, "health": health, "samples": samples, "settled": settled, "end": end,
            "seconds": time.monotonic() - start}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument(
        "--rss-tolerance", type=float, default=0.10, help="how far the end's RSS may be from the settled"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model_file = Path(folder) / "tiny.pt"
        save_model_file(GPT(GPTConfig(d_model=64, num_heads=4, num_layers=2, d_ff=256, max_seq_len=128)), model_file)
        proc, url = start_server(model_file, ["--max-batch", "16", "--max-queue", "64"])
        try:
            result = asyncio.run(soak(url, proc.pid, args.clients, args.seconds))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        stderr = proc.stderr.read()

    tally, health = result["tally"], result["health"]
    counts = tally.counts
    peak = max(rss for _, rss in result["samples"])
    checks = {
        "every admitted request got its final event": counts["final event"] + counts["left mid-stream"]
        == counts["admitted"],
        "no 5xx and no other problem": counts["problems"] == 0,
        "/health counts back to zero": health["running"] == 0 and health["queued"] == 0,
        f"RSS at the end within {args.rss_tolerance:.0%} of after warm-up": abs(result["end"] - result["settled"])
        <= args.rss_tolerance * result["settled"],
        "no traceback on the server's stderr": "Traceback" not in stderr,
    }
    figures = {
        "clients": args.clients,
        "seconds": round(result["seconds"], 1),
        **{k: counts[k] for k in ("requests", "admitted", "final event", "left mid-stream", "bad request refused")},
        "problem count": counts["problems"],
        "tokens_generated": health["tokens_generated"],
        "rss_mib": {"after warm-up": mib(result["settled"]), "peak": mib(peak), "end": mib(result["end"])},
        "rss_mib_every_5s": [mib(rss) for at, rss in result["samples"][::5]],
        "health_after": {k: health[k] for k in ("status", "running", "queued")},
        "checks": checks,
        "problems": tally.problems,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key}: {value}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
