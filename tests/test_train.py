"""Training: the schedule, the optimizer groups, accumulation, checkpoints, exact resume, signals, NaN, tracking."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examplegpt import GPT
from examplegpt.optim import lr_at, parameter_groups
from examplegpt.train import accumulate_gradients
from examplegpt.weights import read_torch_file

from .conftest import (
    MICRO_MODEL,
    REPO,
    assert_one_line_error,
    examples,
    final_weights,
    kill_once_written,
    losses,
    run_cli,
    tiny_config,
    train_args,
)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 1e-3, warmup_steps=10, total_steps=100, min_lr_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:100]))  # cosine falls
    assert lrs[99] == lrs[100] == lrs[119] == pytest.approx(1e-4)  # the last step (99) already runs at the floor


def test_every_parameter_is_in_exactly_one_optimizer_group():
    model = GPT(tiny_config())
    decay, no_decay = (g["params"] for g in parameter_groups(model, 0.1))
    ids = [id(p) for p in decay + no_decay]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert all(p.dim() >= 2 for p in decay) and all(p.dim() == 1 for p in no_decay)
    assert any(p is model.transformer.wte.weight for p in decay)


def test_two_by_four_accumulation_gives_the_gradient_of_a_batch_of_eight():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x = torch.randint(0, 50257, (8, 16))
    y = torch.randint(0, 50257, (8, 16))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads = []
    for micro in (8, 2):
        model.zero_grad()
        loss = accumulate_gradients(model, x, y, micro, torch.device("cpu"), torch.float32, scaler)
        grads.append([p.grad.clone() for p in model.parameters()])
        if micro == 8:
            full_loss = loss
    torch.testing.assert_close(loss, full_loss)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_writes_metrics_plot_checkpoints_and_model(cli, corpus, tmp_path):
    out = tmp_path / "run"
    proc = cli(*train_args(corpus, out, "--max-steps", "8", "--checkpoint-interval", "4", "--keep-last", "1"))
    assert proc.returncode == 0, proc.stderr
    assert "step 8/8" in proc.stdout and "val loss" in proc.stdout
    record = losses(out)
    train_losses = [loss for _, loss, _ in record if loss is not None]
    assert len(train_losses) == 8 and train_losses[-1] < train_losses[0]  # it learns
    assert [s for s, _, v in record if v is not None] == [4, 8]
    assert (out / "loss.png").stat().st_size > 10_000
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint_epoch1_batch8.pt"]  # keep-last 1
    gen = cli("generate", "-c", str(out / "gpt_model.pt"), "-p", "The history of", "-n", "5", "-t", "0")
    assert gen.returncode == 0 and gen.stdout.startswith("The history of"), gen.stderr
    plot = cli("plot", str(out), str(out), "--out", str(tmp_path / "both.png"))
    assert plot.returncode == 0 and (tmp_path / "both.png").exists(), plot.stderr


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical_to_an_uninterrupted_run(corpus, tmp_path):
    steps = ["--max-steps", "30", "--checkpoint-interval", "6"]
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
    resumed = run_cli(*train_args(corpus, killed, *steps, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout

    a, b = final_weights(straight), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(killed)


def test_resume_with_another_model_shape_is_refused(cli, corpus, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "2")).returncode == 0
    proc = cli(*train_args(corpus, out, "--max-steps", "4", "--resume", "auto", "--d-model", "64"))
    assert_one_line_error(proc, "another model configuration")


def start_long_run(corpus, out) -> subprocess.Popen:
    """A training run with no end in sight, returned once its first step is logged."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "examplegpt", *train_args(corpus, out, "--max-steps", "100000")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start_long_run(corpus, out)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGTERM" in stdout and "--resume auto" in stdout
    (saved,) = (out / "checkpoints").iterdir()
    state = read_torch_file(saved)
    assert state["step"] >= 1 and state["optimizer"]["state"]


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_goes_on(cli, corpus, tmp_path):
    out = tmp_path / "run"
    first = start_long_run(corpus, out)
    second = cli(*train_args(corpus, out, "--max-steps", "2"))
    assert_one_line_error(second, f"another training run (pid {first.pid}) is writing to")
    assert first.poll() is None  # untouched
    first.send_signal(signal.SIGTERM)
    assert first.communicate(timeout=120) and first.returncode == 0
    # free once it ended: what refuses a new run now is the ended run's checkpoint, not the lock
    assert_one_line_error(cli(*train_args(corpus, out, "--max-steps", "2")), "already holds", "--resume")


def test_non_finite_loss_is_skipped_then_stops_with_the_last_checkpoint_intact(corpus, tmp_path, monkeypatch):
    from examplegpt.cli import main

    out = tmp_path / "run"
    poison_steps(monkeypatch, {5} | set(range(8, 21)))  # step 5 once, then from step 8 on for good
    status = main(train_args(corpus, out, "--max-steps", "20", "--checkpoint-interval", "3"))
    assert status == 1
    good = read_torch_file(out / "checkpoints" / "checkpoint_epoch1_batch6.pt")
    assert good["step"] == 6 and good["nonfinite_skips"] == 1
    assert all(torch.isfinite(t).all() for t in good["model"].values())
    assert not (out / "gpt_model.pt").exists()


@pytest.mark.slow  # a subprocess: wandb's run is global to a process
def test_wandb_offline_run_logs_without_credentials(corpus, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    proc = run_cli(*train_args(corpus, out, "--max-steps", "2", "--wandb"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list((out / "wandb").glob("offline-run-*"))  # with the run's other files
    assert not (tmp_path / "wandb").exists()  # not in the current folder


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--batch-size", "4096", "--micro-batch-size", "2"], ["lower --batch-size"]),
        (["--batch-size", "6", "--micro-batch-size", "4"], ["multiple of micro_batch_size"]),
        (["--learning-rate", "-1"], ["learning_rate"]),
        (["--resume", "auto"], ["no checkpoint"]),
        (["--preset", "huge"], ["unknown preset"]),
        (["--num-layers", "two"], ["--num-layers"]),
    ],
)
def test_bad_training_input_is_one_line(cli, corpus, tmp_path, extra, words):
    proc = cli(*train_args(corpus, tmp_path / "run", *extra))
    assert_one_line_error(proc, *words)


def test_out_dir_that_cannot_be_written_is_one_line(cli, corpus, tmp_path):
    (tmp_path / "file").write_text("")
    proc = cli(*train_args(corpus, tmp_path / "file" / "run"))
    assert_one_line_error(proc, "cannot write to the output folder")


def without_shape_flags(args: list[str]) -> list[str]:
    """train_args less MICRO_MODEL's shape flags: the --init-from model sets the shape."""
    shape = {i for i, a in enumerate(args) if a in MICRO_MODEL[::2]}
    return [a for i, a in enumerate(args) if i not in shape and i - 1 not in shape]


def test_fine_tune_from_a_hugging_face_folder(cli, corpus, tmp_path, hf_dir):
    out = tmp_path / "run"
    proc = cli(*without_shape_flags(train_args(corpus, out, "--max-steps", "2", "--init-from", str(hf_dir))))
    assert proc.returncode == 0, proc.stderr
    assert "initialised from" in proc.stdout
    assert read_torch_file(out / "gpt_model.pt")["model_config"]["d_model"] == 64  # the HF model's shape
    assert math.isfinite(losses(out)[-1][2])


def test_full_disk_while_saving_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    import errno

    from examplegpt import weights
    from examplegpt.cli import main

    out = tmp_path / "run"
    real_save = torch.save
    saves = {"n": 0}

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] >= 2:  # the second checkpoint hits a full disk half-way
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(weights.torch, "save", save_then_fill_the_disk)  # atomic_torch_save writes with it
    status = main(train_args(corpus, out, "--max-steps", "8", "--checkpoint-interval", "4"))
    assert status == 1
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["checkpoint_epoch1_batch4.pt"]  # no partial file of the second one is left
    assert read_torch_file(out / "checkpoints" / files[0])["step"] == 4


def test_resume_survives_a_metrics_line_cut_short_by_a_kill(cli, corpus, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "4", "--checkpoint-interval", "2")).returncode == 0
    (out / "checkpoints" / "checkpoint_epoch1_batch4.pt").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_lo')  # what a kill -9 in the middle of a write leaves
    proc = cli(*train_args(corpus, out, "--max-steps", "4", "--checkpoint-interval", "2", "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr
    assert [s for s, _, _ in losses(out)] == [1, 2, 3, 4, 4]  # 4 twice: the train line and the val line


# --- the LR schedule against its documented formula --------------------------------------------------


def documented_lr(step, peak, warmup, total, ratio):
    """A direct transcription of lr_at's docstring (and README's optimizer paragraph)."""
    low = peak * ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= max(warmup, total - 1):
        return low
    return low + (peak - low) * (1 + math.cos(math.pi * (step - warmup) / (total - 1 - warmup))) / 2


@settings(max_examples=examples(300), deadline=None)
@given(
    total=st.integers(1, 400),
    warmup=st.integers(0, 450),
    peak=st.floats(1e-6, 1.0),
    ratio=st.floats(0.0, 1.0),
    data=st.data(),
)
def test_lr_schedule_is_its_documented_formula(total, warmup, peak, ratio, data):
    step = data.draw(st.integers(0, total + 5))
    assert lr_at(step, peak, warmup, total, ratio) == pytest.approx(documented_lr(step, peak, warmup, total, ratio))
    if total - 1 >= warmup:  # the last step of a run longer than its warmup runs at the minimum
        assert lr_at(total - 1, peak, warmup, total, ratio) == pytest.approx(peak * ratio)


# --- issue 13: results that were silently wrong ------------------------------------------------------


def final_val_loss(out_dir):
    return [v for _, _, v in losses(out_dir) if v is not None][-1]


def test_validation_loss_does_not_depend_on_the_micro_batch(corpus, tmp_path):
    """The validation set is a fixed set of windows: the same model scores the same at any micro-batch."""
    from examplegpt.cli import main

    split = ["--val-fraction", "0.1"]  # about 20 validation windows
    base = tmp_path / "base"  # a model trained a little, so that windows differ in loss
    assert main(train_args(corpus, base, "--max-steps", "8", *split)) == 0
    scores = []
    for micro in ("1", "4"):
        out = tmp_path / f"micro{micro}"
        # from the same weights, with a learning rate too small to move them: the models compared are the same
        args = [
            "--max-steps",
            "1",
            "--micro-batch-size",
            micro,
            "--learning-rate",
            "1e-12",
            "--eval-windows",
            "12",
            *split,
        ]
        assert main([*train_args(corpus, out, *args), "--init-from", str(base / "gpt_model.pt")]) == 0
        scores.append(final_val_loss(out))
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)


def test_validation_loss_does_not_depend_on_the_number_of_processes(monkeypatch):
    """Each rank scores its share (padded to equal forward passes); the shares add up to the whole set."""
    from examplegpt import evaluate
    from examplegpt.distributed import World

    torch.manual_seed(0)
    model = GPT(tiny_config(max_seq_len=16))
    tokens = torch.randint(0, 50257, (16 * 40 + 1,)).numpy()
    windows = evaluate.validation_windows(tokens, 16, 11)
    assert windows.shape == (11, 17) and (windows == evaluate.validation_windows(tokens, 16, 11)).all()
    cpu = torch.device("cpu")
    whole = evaluate.evaluate_loss(model, windows, 11, cpu, torch.float32)
    monkeypatch.setattr(evaluate, "mean_over_ranks", lambda value, world, device: value / world.size)
    for size, micro in [(1, 3), (2, 2), (3, 4), (4, 1)]:  # without all_reduce: each rank's part of the mean
        parts = [
            evaluate.evaluate_loss(model, windows, micro, cpu, torch.float32, World(r, r, size)) for r in range(size)
        ]
        assert sum(parts) == pytest.approx(whole, abs=1e-5)


def poison_steps(monkeypatch, steps: set[int], on_poison=None) -> None:
    """The loss of these optimizer steps (1-based; 2 micro-steps each) becomes NaN."""
    original = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        logits, loss = original(self, idx, targets)
        if self.training and loss is not None:
            calls["n"] += 1
            if (calls["n"] + 1) // 2 in steps:
                loss = loss * float("nan")
                if on_poison:
                    on_poison()
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)


def test_a_skipped_step_still_evaluates_and_saves_its_checkpoint(corpus, tmp_path, monkeypatch):
    from examplegpt.cli import main

    out = tmp_path / "run"
    poison_steps(monkeypatch, {4})
    assert main(train_args(corpus, out, "--max-steps", "6", "--checkpoint-interval", "4")) == 0
    saved = read_torch_file(out / "checkpoints" / "checkpoint_epoch1_batch4.pt")
    assert saved["step"] == 4 and saved["nonfinite_skips"] == 1
    assert [s for s, _, v in losses(out) if v is not None] == [4, 6]  # eval interval 4: step 4 evaluated


def test_a_stop_signal_during_a_skipped_step_stops_after_that_step(corpus, tmp_path, monkeypatch, capsys):
    from examplegpt.cli import main

    out = tmp_path / "run"
    poison_steps(monkeypatch, {3}, on_poison=lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert main(train_args(corpus, out, "--max-steps", "50")) == 0
    assert "stopped after step 3" in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint_epoch1_batch3.pt"]


def test_a_run_shorter_than_its_warmup_says_so(corpus, tmp_path, capsys):
    from examplegpt.cli import main

    assert main(train_args(corpus, tmp_path / "run", "--max-steps", "3", "--warmup-steps", "5")) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warmup" in line]
    assert len(warning) == 1 and "never reaches" in warning[0]


def test_a_run_as_long_as_its_warmup_says_it_reaches_the_peak_only_at_the_end(corpus, tmp_path, capsys):
    from examplegpt.cli import main

    out = tmp_path / "run"
    assert main(train_args(corpus, out, "--max-steps", "3", "--warmup-steps", "3")) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warmup" in line]
    lrs = [json.loads(line).get("lr") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [lr for lr in lrs if lr is not None][-1] == pytest.approx(3e-3)  # the last step is at the peak
    assert len(warning) == 1 and "never reaches" not in warning[0] and "last step" in warning[0]


def test_the_last_step_runs_at_the_minimum_learning_rate(corpus, tmp_path, capsys):
    from examplegpt.cli import main

    out = tmp_path / "run"
    assert main(train_args(corpus, out, "--max-steps", "5", "--warmup-steps", "1")) == 0
    assert "warmup" not in capsys.readouterr().err
    lrs = [json.loads(line).get("lr") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [lr for lr in lrs if lr is not None][-1] == pytest.approx(3e-3 * 0.1)


def test_a_vocabulary_smaller_than_the_tokenizer_is_one_line(corpus, tmp_path, capsys):
    from examplegpt.cli import main

    assert main(train_args(corpus, tmp_path / "run", "--max-steps", "1", "--vocab-size", "1000")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab_size" in err[0] and "50257" in err[0]


def test_bare_resume_means_auto_and_names_the_checkpoints_epoch(corpus, tmp_path, capsys):
    from examplegpt.cli import build_parser, main

    assert build_parser().parse_args(["train", "--resume"]).resume == "auto"
    out = tmp_path / "run"
    assert main(train_args(corpus, out, "--max-steps", "4", "--checkpoint-interval", "2")) == 0
    (out / "checkpoints" / "checkpoint_epoch1_batch4.pt").unlink()
    capsys.readouterr()
    assert main(train_args(corpus, out, "--max-steps", "4", "--checkpoint-interval", "2", "--resume")) == 0
    assert "resumed from step 2 (epoch 1, batch 2)" in capsys.readouterr().out  # checkpoint_epoch1_batch2.pt


def test_a_refused_start_leaves_nothing_and_a_run_leaves_no_lock(corpus, tmp_path, monkeypatch, capsys):
    from examplegpt.cli import main

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    refused = [a for a in train_args(corpus, tmp_path / "x", "--batch-size", "4096") if a not in ("--out-dir",)]
    refused.remove(str(tmp_path / "x"))  # out_dir: the current folder, as by default
    assert main(refused) == 1
    assert "lower --batch-size" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == before  # no .lock, no checkpoints/
    assert main(train_args(corpus, tmp_path / "run", "--batch-size", "4096")) == 1
    assert not (tmp_path / "run").exists()
    out = tmp_path / "ok"
    assert main(train_args(corpus, out, "--max-steps", "1")) == 0
    assert not list(out.rglob(".lock"))


# --- issue 25: runs that never mix timelines; what users read in the logs ------------------------------


def test_shape_flags_that_conflict_with_the_init_from_model_are_one_line(cli, corpus, tmp_path, hf_dir):
    init = ["--init-from", str(hf_dir)]  # 64 wide, 4 heads
    proc = cli(*train_args(corpus, tmp_path / "run", *init))  # MICRO_MODEL asks for 32 wide, 2 heads
    assert_one_line_error(proc, str(hf_dir), "d_model=64 (this run: 32)", "num_heads=4 (this run: 2)")
    proc = cli(*without_shape_flags(train_args(corpus, tmp_path / "run", *init)), "--d-model", "66")
    assert_one_line_error(proc, "d_model=64 (this run: 66)")  # not "must be divisible by num_heads (12)"
    assert not (tmp_path / "run").exists()


def test_shape_flags_that_conflict_with_the_resumed_checkpoint_name_both_values(cli, corpus, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "2")).returncode == 0  # 32 wide, 2 heads
    proc = cli(*train_args(corpus, out, "--max-steps", "4", "--resume", "--num-heads", "3"))
    assert_one_line_error(proc, "another model configuration", "num_heads=2 (this run: 3)")


def test_init_from_with_resume_is_refused_in_one_line(cli, corpus, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "2")).returncode == 0
    proc = cli(*train_args(corpus, out, "--max-steps", "4", "--resume", "--init-from", str(out / "gpt_model.pt")))
    assert_one_line_error(proc, "--init-from", "--resume", "one of the two")


@pytest.mark.slow
def test_resuming_says_what_changed_of_the_schedule_and_a_finished_run_is_left_alone(cli, corpus, tmp_path):
    out = tmp_path / "run"
    run = train_args(corpus, out, "--checkpoint-interval", "2", "--warmup-steps", "1")
    assert cli(*run, "--max-steps", "4").returncode == 0
    model, metrics = (out / "gpt_model.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    finished = cli(*run, "--max-steps", "4", "--resume")
    assert finished.returncode == 0, finished.stderr
    assert "already complete" in finished.stdout and "done:" not in finished.stdout
    assert (out / "gpt_model.pt").read_bytes() == model and (out / "metrics.jsonl").read_text() == metrics
    longer = cli(*run, "--max-steps", "6", "--learning-rate", "1e-3", "--resume")
    assert longer.returncode == 0, longer.stderr
    (changed,) = [line for line in longer.stderr.splitlines() if "schedule" in line]
    assert "max_steps 4 -> 6" in changed and "learning_rate 0.003 -> 0.001" in changed
    assert "warmup" not in changed  # only what changed is named
    assert (out / "gpt_model.pt").read_bytes() != model


@pytest.mark.slow
def test_the_logged_train_loss_is_the_mean_over_the_log_interval(cli, corpus, tmp_path):
    every = tmp_path / "every"
    assert cli(*train_args(corpus, every, "--max-steps", "5", "--log-interval", "1")).returncode == 0
    per_step = {s: loss for s, loss, _ in losses(every) if loss is not None}
    mean = tmp_path / "mean"
    assert cli(*train_args(corpus, mean, "--max-steps", "5", "--log-interval", "2")).returncode == 0
    logged = {s: loss for s, loss, _ in losses(mean) if loss is not None}
    assert logged == pytest.approx({2: (per_step[1] + per_step[2]) / 2, 4: (per_step[3] + per_step[4]) / 2,
                                    5: per_step[5]}, rel=1e-6)  # fmt: skip


def test_resume_refuses_what_would_change_the_data_order_naming_the_checkpoints_value(cli, corpus, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "2")).returncode == 0
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().upper())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = {
        ("--batch-size", "8"): "--batch-size 4 (this run: 8)",
        ("--seed", "5"): "--seed 1337 (this run: 5)",
        ("--data", str(other)): f"--data {corpus} (this run: {other})",
        ("--val-fraction", "0.1"): "--val-fraction 0.005 (this run: 0.1)",
        ("--eval-windows", "8"): "--eval-windows 4 (this run: 8)",
    }
    for flag, named in refused.items():
        proc = cli(*train_args(corpus, out, "--max-steps", "4", "--resume"), *flag)
        assert_one_line_error(proc, named, "data order", "another --out-dir")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # refused before anything was written


def test_resume_names_each_optimizer_setting_it_changes_and_trains_on(cli, corpus, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "2")).returncode == 0
    proc = cli(*train_args(corpus, out, "--max-steps", "3", "--resume", "--weight-decay", "0", "--grad-clip", "0.5"))
    assert proc.returncode == 0, proc.stderr
    (changed,) = [line for line in proc.stderr.splitlines() if "optimizer settings" in line]
    assert changed.startswith("warning:") and "weight_decay 0.1 -> 0.0" in changed and "grad_clip 1.0 -> 0.5" in changed
    assert "muon" not in changed and "resumed from step 2" in proc.stdout


def test_a_copied_run_folder_resumes_into_the_copy_and_leaves_the_original_alone(corpus, tmp_path):
    """Found by an audit of a change (reverted) that saved the run's paths absolute: the copy's resume
    wrote into the original folder, over its model and metrics."""
    original, copy = tmp_path / "exp1", tmp_path / "exp2"
    original.mkdir()
    args = train_args(corpus, original / "run", "--checkpoint-interval", "4")
    out = args.index("--out-dir")
    del args[out : out + 2]  # the default output folder, in the working folder
    relative = {str(tmp_path / "cache"): "../cache", str(corpus): "../corpus.txt"}
    args = [relative.get(arg, arg) for arg in args]  # the paths as a user in exp1 writes them
    first = run_cli(*args, "--max-steps", "4", cwd=original)
    assert first.returncode == 0, first.stderr
    shutil.copytree(original, copy)
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file()}

    resumed = run_cli(*args, "--max-steps", "8", "--resume", "auto", cwd=copy)
    assert resumed.returncode == 0, resumed.stderr
    assert list(copy.rglob("checkpoint_epoch1_batch8.pt"))
    assert {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} == before
