"""One command that checks ExampleGPT on a CUDA GPU and writes what it measured (report.json, report.md).

Steps, each on its own (a failure is recorded and the next step runs), the report rewritten after each:

1. train, the original README's default run: GPT-2 124M, batch 64 x 1024 tokens, bf16 autocast,
   gradient checkpointing, micro-batch auto, on the bundled Tiny Shakespeare: tokens/s, MFU, peak memory;
2. peak memory at a fixed micro-batch with and without gradient checkpointing (is ~8 GB enough?);
3. fp16 with the gradient scaler for 20 steps: the loss stays finite;
4. --compile on against off: tokens/s;
5. generate: tokens/s against transformers at batch 1 and 8 (same random 124M weights, greedy);
6. serve with 16 clients (skipped with a note where fastapi/uvicorn are not installed);
7. evaluate the model step 1 trained, at auto and int8 precision.

The training steps run the real CLI in a subprocess each (so one's memory never counts in another's),
with a time limit; nothing needs the network (the data is the bundled Tiny Shakespeare). A smoke run
starts the first in a subprocess as on the GPU and runs the others' CLI in its own process: it checks
that every step works, and starting Python and PyTorch for each would be most of its time.

    python benchmarks/gpu_check.py --out gpu_report          # on one CUDA GPU: about 5 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke  # the same steps on a tiny model on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Prints the peak GPU memory after a command, from the same process.
PEAK_MEMORY_WRAPPER = (
    "import sys, torch\n"
    "from examplegpt.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "if torch.cuda.is_available():\n"
    "    print('GPU_CHECK_PEAK_BYTES', torch.cuda.max_memory_allocated(), flush=True)\n"
    "sys.exit(code)\n"
)


class StepFailed(RuntimeError):
    """A step that failed after measuring something: `partial` goes into the report beside the error."""

    def __init__(self, message: str, partial: dict) -> None:
        super().__init__(message)
        self.partial = partial


class Plan:
    """The sizes a run uses: the real ones on a GPU, tiny ones for --smoke on CPU."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        if smoke:  # the smallest shapes and fewest steps each step's code path still runs with
            self.model = ["--d-model", "32", "--num-heads", "2", "--num-layers", "1", "--d-ff", "64", "--max-seq-len", "32"]  # fmt: skip
            self.batch, self.default_steps, self.fixed_micro, self.short_batch = 4, 2, 2, 2
            self.fp16_steps, self.compile_steps, self.new_tokens, self.serve_tokens = 2, 1, 4, 4
            self.memory_steps, self.timing_rounds = 1, 1
            self.shape = dict(n_embd=32, n_head=2, n_layer=1, n_positions=32)
        else:  # GPT-2 124M, the README's default run
            self.model = ["--preset", "124M"]
            self.batch, self.default_steps, self.fixed_micro, self.short_batch = 64, 30, 8, 16
            self.fp16_steps, self.compile_steps, self.new_tokens, self.serve_tokens = 20, 20, 128, 64
            self.memory_steps, self.timing_rounds = 3, 3
            self.shape = dict(n_embd=768, n_head=12, n_layer=12, n_positions=1024)


class Report:
    """Results by step, written to out/report.json and out/report.md after every step."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out, self.header, self.steps = out, header, {}
        out.mkdir(parents=True, exist_ok=True)

    def record(self, name: str, result: dict) -> None:
        self.steps[name] = result
        (self.out / "report.json").write_text(json.dumps({"machine": self.header, "steps": self.steps}, indent=2))
        lines = ["# ExampleGPT GPU check", ""] + [f"- {k}: {v}" for k, v in self.header.items()] + [""]
        lines += ["| step | status | seconds | results |", "|---|---|---:|---|"]
        for step, r in self.steps.items():
            shown = {k: v for k, v in r.items() if k not in ("status", "seconds", "error", "traceback")}
            text = ", ".join(f"{k}: {format_value(v)}" for k, v in shown.items())
            if r.get("error"):
                text += f" **error:** {r['error']}"
            lines.append(f"| {step} | {r['status']} | {r.get('seconds', 0):.0f} | {text} |")
        (self.out / "report.md").write_text("\n".join(lines) + "\n")


def format_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def child_env() -> dict:
    from machine import child_process_env  # benchmarks/machine.py, beside this script

    return child_process_env()


CLI_ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_cli(args: list[str], timeout: float, log: Path, in_process: bool = False) -> tuple[int, str]:
    """`python -c PEAK_MEMORY_WRAPPER ARGS` (the CLI, then its peak GPU memory): exit code and output.
    in_process (smoke runs): `main(ARGS)` in this process instead, without a time limit."""
    if in_process:
        return run_cli_here(args, log)
    env = dict(child_env(), **CLI_ENV)
    command = [sys.executable, "-c", PEAK_MEMORY_WRAPPER, *args]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code = -1
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\n(timed out after {timeout:.0f} s)"
    log.write_text(" ".join(args) + "\n\n" + output)
    return code, output


def run_cli_here(args: list[str], log: Path) -> tuple[int, str]:
    """`main(ARGS)` in this process, its output captured: exit code and output."""
    from examplegpt.cli import main

    os.environ.update(CLI_ENV)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            code = main(args)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    output = captured.getvalue()
    log.write_text(" ".join(args) + "\n\n" + output)
    return code, output


def peak_gib(output: str) -> float | None:
    for line in output.splitlines():
        if line.startswith("GPU_CHECK_PEAK_BYTES"):
            return int(line.split()[1]) / 2**30
    return None


def train_metrics(out_dir: Path, skip_first: int = 1) -> dict:
    """Median tokens/s and MFU of the logged windows after the first `skip_first` (warm-up, compile), last loss."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "tokens_per_sec" in r]
    steady = train[skip_first:] or train
    result = {"steps": train[-1]["step"] if train else 0}
    if steady:
        result["tokens_per_sec"] = statistics.median(r["tokens_per_sec"] for r in steady)
        if all("mfu" in r for r in steady):
            result["mfu"] = statistics.median(r["mfu"] for r in steady)
        result["last_train_loss"] = train[-1]["train_loss"]
    return result


def train_args(plan: Plan, out_dir: Path, data_cache: Path, steps: int, batch: int, *extra: str) -> list[str]:
    log_every = max(1, steps // 6)
    return [
        "train", *plan.model, "--data", "shakespeare", "--cache-dir", str(data_cache), "--out-dir", str(out_dir),
        "--batch-size", str(batch), "--max-steps", str(steps), "--num-epochs", "1000", "--log-interval", str(log_every),
        "--eval-interval", "100000", "--eval-windows", "2", "--checkpoint-interval", "100000",
        "--warmup-steps", "5", "--learning-rate", "6e-4", "--device", plan.device, *extra,
    ]  # fmt: skip


def train_step(plan: Plan, work: Path, name: str, steps: int, batch: int, timeout: float, *extra: str) -> dict:
    out_dir = work / name
    in_process = plan.smoke and name != "train_default"  # the first step in a subprocess, as on the GPU
    code, output = run_cli(
        train_args(plan, out_dir, work / "data", steps, batch, *extra), timeout, work / f"{name}.log", in_process
    )
    result = {"exit_code": code}
    if (out_dir / "metrics.jsonl").exists():
        result.update(train_metrics(out_dir))
    for line in output.splitlines():
        if "micro-batch" in line and "tokens per step" in line:
            result["micro_batch"] = line.split("micro-batch", 1)[1].split(",")[0].strip()
    result["peak_memory_gib"] = peak_gib(output)
    if code != 0:
        last_line = output.strip().splitlines()[-1] if output.strip() else ""
        raise StepFailed(f"{name}: exit code {code}: {last_line}", result)
    return result


def step_train_default(plan: Plan, work: Path, budget: float) -> dict:
    """The README's default run: batch 64, checkpointing on, precision auto (bf16 autocast), micro-batch auto."""
    return train_step(plan, work, "train_default", plan.default_steps, plan.batch, budget)


def step_memory(plan: Plan, work: Path, budget: float) -> dict:
    """Peak memory of the default run at a fixed micro-batch, with and without gradient checkpointing."""
    result = {"micro_batch": plan.fixed_micro}
    for label, flag in (
        ("with_checkpointing", "--use-checkpointing"),
        ("without_checkpointing", "--no-use-checkpointing"),
    ):
        step = train_step(plan, work, f"memory_{label}", plan.memory_steps, plan.fixed_micro * 2, budget / 2,
                          "--micro-batch-size", str(plan.fixed_micro), flag)  # fmt: skip
        result[f"peak_gib_{label}"] = step["peak_memory_gib"]
        result[f"tokens_per_sec_{label}"] = step.get("tokens_per_sec")
    return result


def step_fp16(plan: Plan, work: Path, budget: float) -> dict:
    """fp16 autocast with the gradient scaler: every logged loss is finite."""
    import math

    result = train_step(plan, work, "fp16", plan.fp16_steps, plan.short_batch, budget, "--precision", "fp16")
    records = [json.loads(line) for line in (work / "fp16" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    result["losses_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    if not result["losses_finite"]:
        raise RuntimeError(f"a loss is not finite: {losses}")
    return result


def step_compile(plan: Plan, work: Path, budget: float) -> dict:
    """tokens/s with and without torch.compile, same run otherwise (the first logged window, with the
    compilation, left out)."""
    result = {}
    modes = (("eager", "--no-compile"), ("compiled", "--compile"))
    if plan.smoke:  # compiling on CPU takes minutes: the smoke run checks the step's eager half
        modes = modes[:1]
        result["note"] = "smoke: compiled half not run (CPU compilation takes minutes)"
    for label, flag in modes:
        step = train_step(plan, work, f"compile_{label}", plan.compile_steps, plan.short_batch,
                          budget * (0.3 if label == "eager" else 0.7), flag, "--micro-batch-size", str(plan.short_batch))  # fmt: skip
        result[f"tokens_per_sec_{label}"] = step.get("tokens_per_sec")
    if result.get("tokens_per_sec_eager") and result.get("tokens_per_sec_compiled"):
        result["speedup"] = result["tokens_per_sec_compiled"] / result["tokens_per_sec_eager"]
    return result


def step_generate(plan: Plan, work: Path, budget: float) -> dict:
    """Decode tokens/s of ExampleGPT's generate (as the command prepares the model) and transformers',
    same random weights, greedy, 16-token prompt, batch 1 and 8, the two alternating."""
    import torch
    import transformers

    from examplegpt import generate, load_model
    from examplegpt.device import inference_precision, prepare_for_inference

    device = torch.device(plan.device)
    precision = inference_precision("auto", device)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**plan.shape)).eval()
    folder = work / "hf_random"
    hf.save_pretrained(folder)
    ours = prepare_for_inference(load_model(str(folder)), precision, device)
    hf = hf.to(device, next(ours.parameters()).dtype)
    result = {"precision": precision}

    import timing  # benchmarks/timing.py: synchronised on CUDA

    def timed(fn) -> float:
        return timing.timed(fn, device)

    n = plan.new_tokens
    with torch.inference_mode():
        for batch in (1, 8):
            prompt = torch.randint(0, 50257, (batch, 16), device=device)
            runs = {
                "examplegpt": lambda k: generate(ours, prompt, k, temperature=0),
                "transformers": lambda k: hf.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0),
            }  # fmt: skip
            for run in runs.values():
                run(4)  # warm up (kernels, allocator)
            seconds = {name: [] for name in runs}
            for _ in range(plan.timing_rounds):
                for name, run in runs.items():
                    seconds[name].append(timed(lambda: run(n)))
            for name in runs:
                result[f"batch{batch}_{name}_tokens_per_sec"] = batch * n / statistics.median(seconds[name])
            result[f"batch{batch}_ratio"] = (
                result[f"batch{batch}_examplegpt_tokens_per_sec"] / result[f"batch{batch}_transformers_tokens_per_sec"]
            )
    return result


def step_serve(plan: Plan, work: Path, budget: float) -> dict:
    """16 concurrent (non-streaming) completions against the real `serve` command: aggregate tokens/s."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return {"status": "skipped", "note": f"serve needs fastapi and uvicorn, not installed here ({e.name})"}
    import torch

    from examplegpt import GPT, GPTConfig
    from examplegpt.weights import save_model_file

    shape = dict(d_model=plan.shape["n_embd"], num_heads=plan.shape["n_head"], num_layers=plan.shape["n_layer"],
                 d_ff=4 * plan.shape["n_embd"], max_seq_len=plan.shape["n_positions"])  # fmt: skip
    torch.manual_seed(0)
    model_file = work / "serve_model.pt"
    save_model_file(GPT(GPTConfig(**shape)), model_file)
    env = child_env()
    command = [
        sys.executable,
        "-m",
        "examplegpt",
        "serve",
        "-c",
        str(model_file),
        "--port",
        "0",
        "--device",
        plan.device,
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, said = None, []
        started = time.monotonic()
        while url is None and time.monotonic() - started < min(budget, 120):
            line = server.stdout.readline()
            said.append(line.strip())
            if not line:
                raise RuntimeError(f"serve exited with {server.wait()} before listening: {said[-3:]}")
            url = next((w for w in line.split() if w.startswith("http://")), None)
        if url is None:
            raise RuntimeError("serve did not print its address")
        threading.Thread(target=server.stdout.read, daemon=True).start()  # a full pipe would block the server
        body = {"prompt": [464] * 16, "max_tokens": plan.serve_tokens, "temperature": 0, "ignore_eos": True}

        def complete(results: list, index: int) -> None:
            request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=budget) as response:
                results[index] = json.loads(response.read())["usage"]["completion_tokens"]

        complete([0], 0)  # one untimed request first: the server's first request pays one-off start-up costs
        result = {}
        for clients in (1, 16):
            results = [0] * clients
            threads = [threading.Thread(target=complete, args=(results, i)) for i in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=budget)
            seconds = time.perf_counter() - start
            if sum(results) != clients * plan.serve_tokens:
                raise RuntimeError(f"{clients} clients got {sum(results)} tokens, not {clients * plan.serve_tokens}")
            result[f"clients{clients}_tokens_per_sec"] = sum(results) / seconds
        # sampled with a seed: drawn on the GPU from the request's own generator, the same text twice
        seeded = {"prompt": [464] * 16, "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 1, "n": 2}
        texts = []
        for _ in range(2):
            request = urllib.request.Request(url + "/v1/completions", json.dumps(seeded).encode(),
                                             {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=budget) as response:
                texts.append([c["text"] for c in json.loads(response.read())["choices"]])
        result["seeded_sampling_repeats"] = texts[0] == texts[1]
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as response:
            result["precision"] = json.loads(response.read())["data"][0].get("precision")
        return result
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def step_evaluate(plan: Plan, work: Path, budget: float) -> dict:
    """Perplexity of the model step 1 trained, on the bundled Tiny Shakespeare (scored whole), at auto and int8."""
    import gzip

    model_file = work / "train_default" / "gpt_model.pt"
    if not model_file.exists():
        raise RuntimeError("no model: the train_default step did not finish")
    text_file = work / "tinyshakespeare.txt"
    text = gzip.decompress((REPO / "examplegpt" / "assets" / "tinyshakespeare.txt.gz").read_bytes())
    text_file.write_bytes(text[: len(text) // (200 if plan.smoke else 4)])  # a part, to keep the step short
    result = {}
    for precision in ("auto", "int8"):
        args = ["evaluate", "-c", str(model_file), "--data", str(text_file), "--device", plan.device,
                "--precision", precision, "--json", "--batch-size", "8"]  # fmt: skip
        code, output = run_cli(args, budget / 2, work / f"evaluate_{precision}.log", in_process=plan.smoke)
        if code != 0:
            raise RuntimeError(f"evaluate --precision {precision}: exit code {code}: {output.strip()[-300:]}")
        record = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
        result[f"perplexity_{precision}"] = record["perplexity"]
        result[f"tokens_per_sec_{precision}"] = record["tokens_per_second"]
    result["int8_over_auto"] = result["perplexity_int8"] / result["perplexity_auto"]
    return result


# name, function, seconds allowed on the GPU; compile, the slowest to start, goes last and gets what is left
STEPS = [
    ("train_default", step_train_default, 120),
    ("memory", step_memory, 60),
    ("fp16", step_fp16, 40),
    ("generate", step_generate, 60),
    ("serve", step_serve, 45),
    ("evaluate", step_evaluate, 45),
    ("compile", step_compile, 150),
]
DEADLINE_SECONDS = 450  # the whole run, so that it ends within 8 minutes whatever hangs


def release_gpu_memory() -> None:
    """Give back what an in-process step left cached on the GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def machine_header(plan: Plan) -> dict:
    import torch
    from machine import describe_machine

    header = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mode": "smoke (CPU)" if plan.smoke else "GPU",
    }
    header["machine"] = describe_machine(plan.device if torch.cuda.is_available() or plan.smoke else "cpu")
    if torch.cuda.is_available() and not plan.smoke:
        from examplegpt.device import peak_flops

        props = torch.cuda.get_device_properties(0)
        header["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        peak = peak_flops(torch.device("cuda"))
        header["gpu_peak_bf16_tflops"] = peak / 1e12 if peak else "unknown (no MFU)"
    return header


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check_report", help="folder for report.json, report.md and the logs")
    parser.add_argument("--smoke", action="store_true", help="the same steps on a tiny model on CPU (CI)")
    parser.add_argument("--steps", nargs="+", choices=[name for name, _, _ in STEPS], help="run only these steps")
    parser.add_argument(
        "--deadline-s", type=float, default=DEADLINE_SECONDS, help="end the whole run by then (seconds)"
    )
    args = parser.parse_args()
    plan = Plan(args.smoke)
    if not plan.smoke:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU here; run with --smoke for the CPU check", file=sys.stderr)
            return 1
    out = Path(args.out)
    report = Report(out, machine_header(plan))
    print(f"gpu_check: {report.header}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        work = Path(scratch)
        for name, step, seconds in STEPS:
            if args.steps and name not in args.steps:
                continue
            # a smoke run checks that the steps work, not how fast: a busy CI machine gets time
            budget = seconds * 10 if plan.smoke else min(seconds, args.deadline_s - (time.monotonic() - started))
            begin = time.monotonic()
            try:
                if budget < 15:
                    raise TimeoutError(f"skipped: the run is past {args.deadline_s - 15:.0f} s")
                result = step(plan, work, budget)
                result.setdefault("status", "ok")
            except Exception as e:  # one step's failure must not lose the others
                result = {**getattr(e, "partial", {}), "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
                result["traceback"] = traceback.format_exc()[-2000:]
            result["seconds"] = time.monotonic() - begin
            release_gpu_memory()  # the next steps run in subprocesses on the same GPU
            for log in work.glob(f"{name}*.log"):  # the CLI's own output, kept next to the report
                (out / log.name).write_text(log.read_text())
            report.record(name, result)
            print(f"gpu_check: {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
    print(f"gpu_check: done in {time.monotonic() - started:.0f} s; wrote {out / 'report.md'} and report.json")
    return 0 if all(r["status"] in ("ok", "skipped") for r in report.steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
