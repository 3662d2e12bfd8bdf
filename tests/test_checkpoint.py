"""Checkpoints: names and positions, finding the newest and the later ones, pruning, and where a run starts."""

import pytest
import torch

from examplegpt.checkpoint import (
    Start,
    checkpoint_path,
    checkpoint_position,
    later_checkpoints,
    list_checkpoints,
    load_checkpoint,
    load_start,
    prune_checkpoints,
    resolve_resume,
)
from examplegpt.config import GPTConfig, TrainConfig
from examplegpt.errors import UserError
from examplegpt.model import GPT

from .conftest import tiny_config


def touch_checkpoints(out_dir, positions):
    for epoch, batch in positions:
        path = checkpoint_path(out_dir, epoch, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


@pytest.mark.parametrize("steps, position", [(1, (1, 1)), (10, (1, 10)), (11, (2, 1)), (20, (2, 10))])
def test_the_last_batch_of_an_epoch_is_named_in_that_epoch(steps, position):
    assert checkpoint_position(steps, batches_per_epoch=10) == position


def test_checkpoints_are_ordered_by_epoch_then_batch_not_by_name(tmp_path):
    touch_checkpoints(tmp_path, [(1, 10), (2, 2), (1, 9), (10, 1)])
    (tmp_path / "checkpoints" / "abandoned-1").mkdir()  # a folder set aside is never a checkpoint
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == [f"checkpoint_epoch{e}_batch{b}.pt" for e, b in [(1, 9), (1, 10), (2, 2), (10, 1)]]
    assert resolve_resume("auto", tmp_path).name == "checkpoint_epoch10_batch1.pt"
    assert [p.name for p in later_checkpoints(tmp_path, (1, 10))] == names[2:]
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == names[2:]


def test_resume_auto_without_checkpoints_and_a_model_file_are_refused(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_resume("auto", tmp_path)
    torch.save({"model": {}, "model_config": {}}, tmp_path / "gpt_model.pt")
    with pytest.raises(UserError, match="model file, not a training checkpoint"):
        load_checkpoint(tmp_path / "gpt_model.pt")


def test_init_from_and_resume_together_are_refused(tmp_path):
    with pytest.raises(UserError, match="pass one of the two"):
        load_start("auto", str(tmp_path / "gpt_model.pt"), tmp_path)
    assert load_start(None, None, tmp_path).base_config() is None


def test_an_init_from_model_fixes_every_shape_setting_but_dropout():
    start = Start(pretrained=GPT(tiny_config()), init_from="hf")
    assert start.base_config()["model"]["num_heads"] == 4 and "dropout" not in start.base_config()["model"]
    start.check_model_shape({**start.base_config()["model"], "dropout": 0.1})
    with pytest.raises(UserError) as refused:
        start.check_model_shape({**start.base_config()["model"], "d_model": 32, "num_heads": 2})
    assert "d_model=64 (this run: 32), num_heads=4 (this run: 2)" in str(refused.value)


def resume_state(**train):
    return {"model_config": {**vars(GPTConfig())}, "config": {"train": {**vars(TrainConfig()), **train}}}


def test_a_resumed_run_names_what_it_changes_of_the_schedule():
    start = Start(resume_state=resume_state(max_steps=40, resume=None, init_from="x"))
    assert "resume" not in start.base_config()["train"] and "init_from" not in start.base_config()["train"]
    assert start.schedule_changes(TrainConfig(max_steps=40)) is None
    changed = start.schedule_changes(TrainConfig(max_steps=60, learning_rate=2e-4))
    assert "max_steps 40 -> 60" in changed and "learning_rate 0.0001 -> 0.0002" in changed
    with pytest.raises(UserError, match="another model configuration: num_heads=12"):
        start.check_model_shape({**vars(GPTConfig()), "num_heads": 6})


def test_a_resumed_checkpoint_fixes_the_batch_seed_and_data_but_not_how_the_run_computes():
    state = resume_state(batch_size=8, seed=3)
    state["config"]["data"] = {"data": "notes.txt"}
    start = Start(resume_state=state)
    start.check("train", {**vars(TrainConfig()), "batch_size": 8, "seed": 3, "device": "cpu", "log_interval": 1})
    with pytest.raises(UserError) as refused:
        start.check("train", {**vars(TrainConfig()), "batch_size": 64, "seed": 3})
    assert "--batch-size 8 (this run: 64)" in str(refused.value) and "seed" not in str(refused.value)
    with pytest.raises(UserError, match="--data notes.txt"):
        start.check("data", {"data": "other.txt", "cache_dir": "elsewhere"})
    start.check("data", {"data": "notes.txt", "cache_dir": "elsewhere"})  # where the tokens are cached is free


def test_a_resume_may_name_the_same_text_file_another_way(tmp_path, monkeypatch):
    """--data ./notes.txt is the checkpoint's notes.txt: it was refused as another data setting."""
    from examplegpt.checkpoint import Start

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("some text")
    (tmp_path / "other.txt").write_text("other text")
    state = resume_state(batch_size=8, seed=3)
    state["config"]["data"] = {"data": "notes.txt"}
    start = Start(resume_state=state)
    start.check("data", {"data": "./notes.txt"})
    start.check("data", {"data": str(tmp_path / "notes.txt")})
    with pytest.raises(UserError, match="--data notes.txt"):
        start.check("data", {"data": "./other.txt"})


def test_a_truncated_newest_checkpoint_says_so_and_names_the_one_before_it(tmp_path, corpus, cli):
    from .conftest import assert_one_line_error, train_args

    out = tmp_path / "run"
    run = train_args(corpus, out, "--max-steps", "4", "--checkpoint-interval", "2")
    assert cli(*run).returncode == 0
    newest, before = (out / "checkpoints" / f"checkpoint_epoch1_batch{b}.pt" for b in (4, 2))
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)  # a copy cut short
    cut = newest.read_bytes()
    proc = cli(*run, "--max-steps", "6", "--resume", "auto")
    assert_one_line_error(proc, str(newest), "damaged (truncated)", f"--resume {before}")
    assert newest.read_bytes() == cut  # left as it is: the user decides
    back = cli(*run, "--max-steps", "6", "--resume", str(before))  # what the line suggests
    assert back.returncode == 0, back.stderr
    assert "resumed from step 2" in back.stdout


def test_a_checkpoint_damaged_inside_a_tensor_is_refused_not_resumed(tmp_path, corpus, cli):
    """torch.load does not check the zip's checksums: zeros written over a tensor's bytes loaded fine, the run
    resumed from the damaged weights, and --keep-last then deleted the last intact checkpoint."""
    import zipfile

    from .conftest import assert_one_line_error, train_args

    out = tmp_path / "run"
    run = train_args(corpus, out, "--max-steps", "4", "--checkpoint-interval", "2", "--keep-last", "2")
    assert cli(*run).returncode == 0
    newest, before = (out / "checkpoints" / f"checkpoint_epoch1_batch{b}.pt" for b in (4, 2))
    with zipfile.ZipFile(newest) as archive:  # the largest entry: a weight or optimizer tensor's bytes
        entry = max(archive.infolist(), key=lambda info: info.file_size)
        offset = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra) + entry.file_size // 2
    with open(newest, "r+b") as f:
        f.seek(offset)
        f.write(bytes(64))
    proc = cli(*run, "--max-steps", "6", "--resume", "auto")
    assert_one_line_error(proc, str(newest), "damaged (corrupt", f"--resume {before}")
    assert before.exists()
