"""What a run records: metrics.jsonl (fresh, or cut back on resume), the log line's mean loss, wandb's folder."""

import json
import sys
import types

import torch

from examplegpt.distributed import World
from examplegpt.metrics import MetricsLog, TrainingLog, read_metrics


def test_a_fresh_run_starts_a_fresh_log_and_a_resumed_one_drops_the_steps_it_redoes(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    MetricsLog(tmp_path, {}, use_wandb=False, project="p", resume_step=2).log({"step": 3, "train_loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    MetricsLog(tmp_path, {}, use_wandb=False, project="p")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_line_cut_short_by_a_kill_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "train_lo')
    assert read_metrics(tmp_path) == [{"step": 1}]


def test_wandb_writes_into_the_run_folder(tmp_path, monkeypatch):
    calls = {}
    fake = types.SimpleNamespace(init=lambda **kwargs: calls.update(kwargs) or "run")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    MetricsLog(tmp_path, {"a": 1}, use_wandb=True, project="p")
    assert calls["dir"] == str(tmp_path) and calls["project"] == "p"


def test_the_log_line_reports_the_loss_it_is_given_and_counts_only_finite_steps(tmp_path, capsys):
    metrics = MetricsLog(tmp_path, {}, use_wandb=False, project="p")
    log = TrainingLog(metrics, World(), torch.device("cpu"), steps=(0, 4), tokens_per_step=10,
                      batches_per_epoch=2, flops_per_token=1, peak_flops=None)  # fmt: skip
    for finite in (True, False, True):
        log.step_done(finite)
    log.train_line(3, 1e-3, torch.tensor(2.5), torch.tensor(0.5))
    (record,) = read_metrics(tmp_path)
    assert record["train_loss"] == 2.5 and record["epoch"] == 2 and "mfu" not in record
    assert log.window_tokens == 0  # the throughput window starts again
    assert "step 3/4 | loss 2.5000" in capsys.readouterr().out
