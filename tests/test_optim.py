"""The optimizers: Muon's parameter split, its schedule, its checkpoints across processes; bf16 on CPU."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from examplegpt import GPT, DataConfig, GPTConfig, TrainConfig
from examplegpt.device import pick_dtype
from examplegpt.muon import Float32Muon, muon_class, orthogonalize
from examplegpt.optim import MuonWithAdamW, hidden_matrices, make_optimizer, muon_split, set_learning_rates
from examplegpt.weights import read_torch_file

from .conftest import (
    REPO,
    assert_one_line_error,
    final_weights,
    kill_once_written,
    losses,
    run_cli,
    tiny_config,
    train_args,
    why_workers_failed,
)

MUON = ["--optimizer", "muon", "--muon-learning-rate", "0.02"]


def test_every_parameter_is_in_exactly_one_group_and_muon_gets_only_the_blocks_matrices():
    model = GPT(tiny_config(num_layers=3))
    muon_groups, adamw_groups = muon_split(model, TrainConfig(optimizer="muon"))
    muon = [p for g in muon_groups for p in g["params"]]
    adamw = [p for g in adamw_groups for p in g["params"]]
    ids = [id(p) for p in muon + adamw]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    names = {id(p): n for n, p in model.named_parameters()}  # the tied LM head is wte: one entry
    assert sorted(names[id(p)] for p in muon) == sorted(
        f"transformer.h.{i}.{m}.weight"
        for i in range(3)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    embeddings, vectors = adamw_groups
    assert {names[id(p)] for p in embeddings["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(p.dim() == 1 for p in vectors["params"]) and vectors["weight_decay"] == 0.0
    assert hidden_matrices(model)[0] is model.transformer.h[0].attn.c_attn.weight


def test_both_optimizers_follow_the_schedule_from_their_own_peak():
    model = GPT(tiny_config())
    cfg = TrainConfig(optimizer="muon", learning_rate=1e-3, muon_learning_rate=0.02)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    set_learning_rates(optimizer, 5e-4, cfg)  # half of the peak, as lr_at gives it halfway down
    assert [g["lr"] for g in optimizer.muon.param_groups] == [pytest.approx(0.01)]
    assert [g["lr"] for g in optimizer.adamw.param_groups] == [5e-4, 5e-4]
    adamw_only = make_optimizer(model, TrainConfig(learning_rate=1e-3), torch.device("cpu"))
    set_learning_rates(adamw_only, 5e-4, cfg)
    assert isinstance(adamw_only, torch.optim.AdamW) and {g["lr"] for g in adamw_only.param_groups} == {5e-4}


def test_a_muon_step_changes_every_parameter_and_its_state_round_trips():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    x = torch.randint(0, 50257, (2, 16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x, x)[1].backward()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    state = optimizer.state_dict()
    assert set(state) == {"muon", "adamw"} and len(state["muon"]["state"]) == 4 * 2  # one momentum per matrix
    again = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    again.load_state_dict(state)
    for a, b in zip(again.muon.state.values(), optimizer.muon.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


# --- bf16 on CPU: decided by the CPU's flags and the model's width -------------------------------------------

CPU = torch.device("cpu")
AMX = {"avx2", "avx512f", "amx_tile", "amx_bf16"}
AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}
ZEN3 = {"avx2", "fma", "f16c"}  # this machine: no native bf16


@pytest.mark.parametrize("flags", [AMX, AVX512_BF16])
def test_cpu_amp_is_bf16_for_a_wide_model_on_a_cpu_with_native_bf16(flags):
    assert pick_dtype("auto", CPU, True, d_model=768, flags=flags) == torch.bfloat16
    assert pick_dtype("auto", CPU, True, d_model=192, flags=flags) == torch.float32  # tiny: bf16 is slower
    assert pick_dtype("auto", CPU, True, d_model=256, flags=flags) == torch.bfloat16  # the measured crossover
    assert pick_dtype("fp32", CPU, True, d_model=768, flags=flags) == torch.float32  # fp32 still forces fp32
    assert pick_dtype("auto", CPU, False, d_model=768, flags=flags) == torch.float32  # --no-amp


def test_cpu_amp_is_fp32_on_a_cpu_without_native_bf16():
    assert pick_dtype("auto", CPU, True, d_model=768, flags=ZEN3) == torch.float32
    assert pick_dtype("auto", CPU, True, d_model=4096, flags=set()) == torch.float32
    assert pick_dtype("bf16", CPU, True, d_model=64, flags=ZEN3) == torch.bfloat16  # asked for: given


def test_this_machine_trains_in_the_format_its_flags_call_for(cli, corpus, tmp_path):
    from examplegpt.device import cpu_prefers_bf16

    expected = "bfloat16" if cpu_prefers_bf16(32) else "float32"
    proc = cli(*[a for a in train_args(corpus, tmp_path / "run", "--max-steps", "1") if a != "--no-amp"])
    assert proc.returncode == 0, proc.stderr
    assert f"| {expected} |" in proc.stdout  # the start line says which format was chosen


# --- through the real CLI ---------------------------------------------------------------------------------------


def weight_hash(out_dir) -> str:
    weights = final_weights(out_dir)
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_muon_kill_and_resume_in_fresh_processes_is_bit_identical_to_an_uninterrupted_run(corpus, tmp_path):
    steps = [*MUON, "--max-steps", "24", "--checkpoint-interval", "6", "--grad-clip", "0.5"]  # 2 micro-steps a step
    straight = tmp_path / "straight"
    assert run_cli(*train_args(corpus, straight, *steps)).returncode == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "examplegpt", *train_args(corpus, killed, *steps)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    first = killed / "checkpoints" / "checkpoint_epoch1_batch6.pt"
    kill_once_written(proc, first, timeout=240)
    assert first.exists() and not (killed / "gpt_model.pt").exists()
    saved = read_torch_file(first)["optimizer"]
    assert set(saved) == {"muon", "adamw"} and saved["muon"]["state"]  # Muon's momentum is in the checkpoint
    resumed = run_cli(*train_args(corpus, killed, *steps, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout

    assert weight_hash(straight) == weight_hash(killed)
    assert losses(straight) == losses(killed)


def test_resume_with_the_other_optimizer_is_one_line(cli, corpus, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "2")).returncode == 0
    proc = cli(*train_args(corpus, out, "--max-steps", "4", "--resume", "auto", *MUON))
    assert_one_line_error(proc, "--optimizer adamw")


def test_fine_tune_with_muon_from_an_adamw_model(cli, corpus, tmp_path):
    base = tmp_path / "base"
    assert cli(*train_args(corpus, base, "--max-steps", "4")).returncode == 0
    tuned = tmp_path / "tuned"
    proc = cli(*train_args(corpus, tuned, "--max-steps", "4", "--init-from", str(base / "gpt_model.pt"), *MUON))
    assert proc.returncode == 0, proc.stderr
    assert "optimizer fresh" in proc.stdout
    assert losses(tuned)[0][1] < losses(base)[0][1]  # it starts from the trained weights


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--optimizer", "sgd"], ["optimizer", "adamw", "muon"]),
        (["--optimizer", "muon", "--muon-learning-rate", "0"], ["muon_learning_rate"]),
        (["--optimizer", "muon", "--muon-momentum", "1"], ["muon_momentum"]),
    ],
)
def test_bad_muon_settings_are_one_line(cli, corpus, tmp_path, extra, words):
    assert_one_line_error(cli(*train_args(corpus, tmp_path / "run", *extra)), *words)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_muon_under_two_processes_matches_one_process(corpus, tmp_path, mode):
    """Where Newton-Schulz runs in bf16 (CPUs with native bf16), a different summation order (the all-reduce,
    FSDP's sharded matmuls) moves each Muon update by bf16 rounding (2-6% of it per step, measured; with the
    iterations in float64 FSDP's result equals one process's): close, not bit-equal. One update moves a weight
    by about 4e-3 here."""
    steps = [*MUON, "--batch-size", "8", "--val-fraction", "0.1", "--max-steps", "6"]
    one = tmp_path / "one"
    assert run_cli(*train_args(corpus, one, *steps, "--micro-batch-size", "4")).returncode == 0
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    command += ["-m", "examplegpt", *train_args(corpus, two, *steps, *(["--fsdp"] if mode == "fsdp" else []))]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, why_workers_failed(proc.stderr)
    a, b = final_weights(one), final_weights(two)
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    assert difference < 1.5e-2, difference
    for (s1, l1, v1), (s2, l2, v2) in zip(losses(one), losses(two)):
        assert s1 == s2 and (l1 is None or abs(l1 - l2) < 1e-2) and (v1 is None or abs(v1 - v2) < 1e-2), (
            l1,
            l2,
            v1,
            v2,
        )


@pytest.mark.slow
def test_the_optimizer_sweep_runs_on_cpu_without_the_gpu_image_s_missing_packages(tmp_path):
    """benchmarks/bench_optimizers.py --smoke, with datasets, fastapi, wandb and transformers made unimportable
    (the GPU image has none of them): it writes the table, the JSON and the curves."""
    blocked = "import sys, runpy\nfor m in ('datasets', 'fastapi', 'wandb', 'transformers'): sys.modules[m] = None\n"
    script = REPO / "benchmarks" / "bench_optimizers.py"
    run = f"{blocked}sys.argv = ['bench', '--smoke', '--out', {str(tmp_path)!r}]\nrunpy.run_path({str(script)!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(r["optimizer"], r["seed"]) for r in results["runs"]} == {(o, s) for o in ("adamw", "muon") for s in (0, 1)}
    assert {e["shape"] for e in results["equal_time"]} == {"smoke"}
    assert "| smoke | shakespeare | muon |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_the_quick_start_config_file_is_read_by_train(monkeypatch):
    """configs/shakespeare.toml (the README's first command) names only settings `train --config` knows."""
    from examplegpt.cli import build_parser, resolve

    monkeypatch.chdir(REPO)  # the README runs it from the repository root
    args = build_parser().parse_args(["train", "--config", "configs/shakespeare.toml", "--max-steps", "7"])
    configs = resolve(args, {"model": GPTConfig, "data": DataConfig, "train": TrainConfig})
    assert configs["data"].data == "shakespeare" and configs["train"].max_steps == 7  # flags win over the file
    assert configs["model"].d_model <= 256  # sized for a CPU


# --- Muon's Newton-Schulz iterations: bf16 where the CPU has it natively, float32 elsewhere ----------------------


@pytest.mark.parametrize(
    "flags, expected",
    [(AMX, torch.optim.Muon), (AVX512_BF16, torch.optim.Muon), (ZEN3, Float32Muon), (set(), Float32Muon)],
)
def test_muon_iterates_in_float32_exactly_where_the_cpu_lacks_native_bf16(flags, expected):
    assert muon_class(CPU, flags) is expected
    assert muon_class(torch.device("cuda"), ZEN3) is torch.optim.Muon  # a GPU's bf16 is native whatever the CPU


@pytest.mark.parametrize("shape", [(96, 32), (32, 32), (32, 128)])  # tall, square, wide
def test_the_iterations_are_torch_s_in_bf16_and_close_to_float64_in_float32(shape):
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    update = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ns = ((DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS)
    assert torch.equal(orthogonalize(update, *ns, torch.bfloat16), _zeropower_via_newtonschulz(update, *ns))
    exact = orthogonalize(update.double(), *ns, torch.float64)
    assert (orthogonalize(update, *ns, torch.float32) - exact).abs().max() < 1e-5  # bf16's own error: ~1e-2
    assert update.equal(torch.randn(shape, generator=torch.Generator().manual_seed(0)))  # the input is untouched


@pytest.mark.parametrize("nesterov", [True, False])
def test_float32_muon_steps_as_torch_s_muon_up_to_bf16_rounding_and_shares_its_state(nesterov):
    generator = torch.Generator().manual_seed(0)
    shapes = [(96, 32), (32, 32), (32, 128)]  # tall, square, wide
    start = [torch.randn(shape, generator=generator) / 30 for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]
    settings = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1)
    params = {}
    for cls in (Float32Muon, torch.optim.Muon):
        params[cls] = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = cls(params[cls], **settings)
        for step_grads in grads:  # the same gradients, so the momenta match and only the iterations differ
            for p, g in zip(params[cls], step_grads):
                p.grad = g.clone()
            optimizer.step()
    for ours, theirs, w in zip(params[Float32Muon], params[torch.optim.Muon], start):
        assert (ours - theirs).norm() < 0.03 * (theirs - w).norm()  # bf16 rounds the updates by ~1.2% here
    state = optimizer.state_dict()
    ours = Float32Muon(params[Float32Muon], **settings)
    ours.load_state_dict(state)  # a checkpoint of torch's Muon resumes here, and the other way round
    assert ours.state_dict()["param_groups"] == state["param_groups"]
    assert all(torch.equal(ours.state[p]["momentum_buffer"], optimizer.state[q]["momentum_buffer"])
               for p, q in zip(params[Float32Muon], params[torch.optim.Muon]))  # fmt: skip


def test_muon_on_a_pytorch_without_it_is_one_line(cli, corpus, tmp_path, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")  # PyTorch before 2.9
    result = cli(*train_args(corpus, tmp_path / "run", "--optimizer", "muon"))
    assert_one_line_error(result, "PyTorch 2.9", "--optimizer adamw")
    assert not (tmp_path / "run").exists()  # refused with the settings, before any data is read
