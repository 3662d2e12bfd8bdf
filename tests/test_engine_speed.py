"""One request through the batching engine runs at `generate`'s speed (issue 24): a ratio within one process.

The process is a fresh interpreter, not the suite's: how fast PyTorch runs on a thread depends on which
other threads of the process have run it (batching.py, "Which thread"), and the suite's have.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO, machine_threads

SCRIPT = textwrap.dedent(
    """
    import os, threading, time
    import torch
    from examplegpt import GPT, GPTConfig
    from examplegpt.batching import BatchEngine, SamplingParams
    from examplegpt.cpu_inference import fast_cpu_inference
    from examplegpt.generate import generate
    from examplegpt.reproducibility import pin_cpu_arithmetic

    pin_cpu_arithmetic()  # as the commands do
    torch.manual_seed(0)
    model = GPT(GPTConfig(num_layers=6, d_model=384, num_heads=6, d_ff=1536)).eval().requires_grad_(False)
    prompt = torch.randint(0, 50257, (1, 16)).tolist()
    n = 16

    def sleeps():  # voluntary context switches per live thread of the process: how often each slept on a futex
        counts = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/status") as status:
                    counts[tid] = sum(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt"))
            except FileNotFoundError:  # the thread ended meanwhile
                pass
        return counts

    def slept_per_token(before):
        return sum(count - before.get(tid, 0) for tid, count in sleeps().items()) / n

    def generate_rate():
        before, start = sleeps(), time.perf_counter()
        generate(model, torch.tensor(prompt), n, temperature=0)
        return n / (time.perf_counter() - start), slept_per_token(before)

    def engine_rate():  # as the serve command runs it: the engine here, the requests from another thread
        engine, done, result = BatchEngine(model, max_batch=4), threading.Event(), []

        def client():
            before, start = sleeps(), time.perf_counter()
            params = SamplingParams(max_tokens=n, temperature=0, stop_at_eos=False)
            engine.submit(prompt[0], params, lambda e: e.finish_reason and done.set())
            done.wait()
            result.append((n / (time.perf_counter() - start), slept_per_token(before)))  # the engine still alive

        engine.run_beside(client)
        return result[0]

    with fast_cpu_inference(model):
        BatchEngine(model, max_batch=4).warm_up()
        generate_rate()
        rates = {"generate": [], "engine": []}
        for _ in range(6):  # alternating; the best of each: the machine's other load only ever slows a run
            for name, rate in (("generate", generate_rate), ("engine", engine_rate)):
                rates[name].append(rate())
    print("rates", rates)
    print("generate_sleeps", min(s for _, s in rates["generate"]))
    print("engine_sleeps", min(s for _, s in rates["engine"]))
    print("ratio", max(r for r, _ in rates["engine"]) / max(r for r, _ in rates["generate"]))
    """
)


@pytest.mark.slow
@pytest.mark.alone  # a ratio of speeds: no other test beside it
def test_one_request_through_the_engine_runs_at_least_0_8x_generate():
    env = machine_threads(dict(os.environ, PYTHONPATH=str(REPO)))  # libgomp's thread pools are what is measured
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, cwd=REPO, env=env
    )
    assert proc.returncode == 0, proc.stderr
    printed = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert float(printed["ratio"]) >= 0.8, proc.stdout
    # Why it would be slower, seen whatever the machine's load: libgomp's workers sleeping at every op
    # (about one sleep per parallel op, a dozen or more per token) where `generate`'s spin
    assert float(printed["engine_sleeps"]) <= float(printed["generate_sleeps"]) + 2, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--sample"], ["--compare-packing"]])
def test_the_batching_benchmark_runs(extra):
    command = [sys.executable, str(REPO / "benchmarks" / "bench_batching.py"), "--layers", "1", "--d-model", "64",
               "--heads", "2", "--clients", "1", "2", "--rounds", "1", "--new-tokens", "4", *extra]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CPU ")  # the machine first
    expected = {(): "on a thread of its own", ("--sample",): "sampled at", ("--compare-packing",): "packed / plain"}
    assert expected[tuple(extra)] in proc.stdout
