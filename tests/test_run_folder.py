"""The run folder: one run at a time, and a resume from an earlier checkpoint never mixes two timelines."""

import pytest
import torch

from examplegpt.checkpoint import checkpoint_path, list_checkpoints
from examplegpt.errors import UserError
from examplegpt.run_folder import claim_out_dir, set_aside_abandoned_branch

from .conftest import assert_one_line_error, final_weights, losses, train_args


def test_a_folder_is_claimed_by_one_run_and_the_lock_goes_with_it(tmp_path):
    out = tmp_path / "run"
    with claim_out_dir(out):
        with pytest.raises(UserError, match="another training run"), claim_out_dir(out):
            pass
    assert not list(out.rglob(".lock"))
    with pytest.raises(RuntimeError), claim_out_dir(tmp_path / "refused" / "run"):
        raise RuntimeError  # a run that fails before it wrote anything leaves no folder behind
    assert not (tmp_path / "refused").exists()


def test_checkpoints_past_the_resumed_one_are_set_aside_with_a_copy_of_the_history(tmp_path):
    for epoch, batch in [(1, 2), (1, 4), (2, 1)]:
        path = checkpoint_path(tmp_path, epoch, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{epoch}/{batch}")
    (tmp_path / "gpt_model.pt").write_text("abandoned")
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n')
    assert set_aside_abandoned_branch(tmp_path, (2, 1)) is None  # the newest: nothing to set aside
    line = set_aside_abandoned_branch(tmp_path, (1, 2))
    (folder,) = (tmp_path / "checkpoints").glob("abandoned-*")
    assert str(folder) in line and "2 later checkpoints and gpt_model.pt" in line
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_epoch1_batch2.pt"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint_epoch1_batch4.pt", "checkpoint_epoch2_batch1.pt", "gpt_model.pt", "metrics.jsonl"
    ]  # fmt: skip
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "gpt_model.pt").exists()


@pytest.mark.slow
def test_going_back_to_an_earlier_checkpoint_then_resuming_continues_the_branch_chosen(cli, corpus, tmp_path):
    out = tmp_path / "run"
    every_2 = ["--checkpoint-interval", "2", "--eval-interval", "2"]
    assert cli(*train_args(corpus, out, "--max-steps", "6", *every_2)).returncode == 0  # checkpoints 2, 4, 6
    abandoned = final_weights(out)
    # go back to step 2 and take another branch (another learning rate), stopped at step 4
    back = cli(*train_args(corpus, out, "--max-steps", "4", *every_2, "--learning-rate", "1e-3",
                           "--resume", str(out / "checkpoints" / "checkpoint_epoch1_batch2.pt")))  # fmt: skip
    assert back.returncode == 0, back.stderr
    (moved,) = [line for line in back.stdout.splitlines() if "abandoned" in line]
    assert "2 later checkpoints and gpt_model.pt" in moved
    (folder,) = (out / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in folder.glob("*.pt")) == [
        "checkpoint_epoch1_batch4.pt", "checkpoint_epoch1_batch6.pt", "gpt_model.pt"
    ]  # fmt: skip
    chosen = final_weights(out)
    again = cli(*train_args(corpus, out, "--max-steps", "6", *every_2, "--learning-rate", "1e-3", "--resume"))
    assert again.returncode == 0, again.stderr
    assert "resumed from step 4" in again.stdout  # the chosen branch's newest, not the abandoned step 6
    assert [s for s, train, _ in losses(out) if train is not None] == [1, 2, 3, 4, 5, 6]  # one timeline
    final = final_weights(out)
    assert not all(torch.equal(final[k], abandoned[k]) for k in final)
    assert not all(torch.equal(final[k], chosen[k]) for k in final)  # it trained on from the chosen branch


def test_a_new_run_in_a_folder_holding_a_runs_checkpoints_is_refused(corpus, tmp_path, cli):
    """Without --resume, a second run would leave the first one's checkpoints for a later --resume to pick up."""
    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "2", "--checkpoint-interval", "1")).returncode == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    model = (out / "gpt_model.pt").read_bytes()
    again = cli(*train_args(corpus, out, "--max-steps", "1"))
    assert_one_line_error(again, "already holds", "--resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "gpt_model.pt").read_bytes() == model


def test_a_run_folder_given_as_a_model_says_which_file_to_pass(corpus, tmp_path, cli):
    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "1")).returncode == 0
    proc = cli("generate", "-c", str(out), "-p", "x", "-n", "2")
    assert_one_line_error(proc, "run's folder", "gpt_model.pt")


def test_plot_into_a_missing_folder_is_one_line(corpus, tmp_path, cli):
    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "1")).returncode == 0
    proc = cli("plot", str(out), "--out", str(tmp_path / "nonexistent" / "x.png"))
    assert_one_line_error(proc, "no such folder")


def test_a_new_run_in_a_folder_holding_an_earlier_runs_model_and_metrics_is_refused(corpus, tmp_path, cli):
    """Without checkpoints (deleted, or a kill before the first), a new run would overwrite gpt_model.pt and
    cut metrics.jsonl back to nothing."""
    import shutil

    out = tmp_path / "run"
    assert cli(*train_args(corpus, out, "--max-steps", "1")).returncode == 0
    shutil.rmtree(out / "checkpoints")
    model, metrics = (out / "gpt_model.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    again = cli(*train_args(corpus, out, "--max-steps", "1"))
    assert_one_line_error(again, str(out), "gpt_model.pt and metrics.jsonl", "another --out-dir")
    assert (out / "gpt_model.pt").read_bytes() == model and (out / "metrics.jsonl").read_text() == metrics


def test_a_new_run_in_the_current_folder_keeps_the_model_generate_reads_there(corpus, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt_model.pt").write_bytes(b"a model the user keeps here")
    args = train_args(corpus, tmp_path / "unused", "--max-steps", "1")
    at = args.index("--out-dir")
    del args[at : at + 2]  # the default --out-dir: the current folder
    assert_one_line_error(cli(*args), "the current folder", "gpt_model.pt")
    assert (tmp_path / "gpt_model.pt").read_bytes() == b"a model the user keeps here"
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
