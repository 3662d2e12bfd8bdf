"""Failure drills: the real commands, as subprocesses, under kills, corruption, hostile files and bad input."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from examplegpt.checkpoint import CHECKPOINT_NAME
from examplegpt.weights import read_torch_file

from ..conftest import REPO, assert_one_line_error, final_weights, make_text, run_cli, train_args

pytestmark = pytest.mark.slow  # the real commands as subprocesses, killed and restarted

KILLS = 10  # each at a random moment after a checkpoint of its own


def launch(args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "examplegpt", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


def complete_checkpoints(out_dir):
    folder = out_dir / "checkpoints"
    return [p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name)] if folder.exists() else []


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_weights(corpus, tmp_path, capsys):
    steps = ["--max-steps", "300", "--num-epochs", "100", "--checkpoint-interval", "3", "--eval-interval", "1000",
             "--log-interval", "50"]  # fmt: skip
    straight = tmp_path / "straight"
    # 100 checkpoints written and synced: on a busy machine's disk that alone has taken 5 minutes
    assert run_cli(*train_args(corpus, straight, *steps), timeout=1200).returncode == 0

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills, reached = 0, []
    while kills < KILLS:
        done = max((read_torch_file(p)["step"] for p in complete_checkpoints(out)), default=0)
        proc = launch(train_args(corpus, out, *steps, *(["--resume", "auto"] if done else [])))
        # wait until this run has written a checkpoint of its own, then kill it at a random moment:
        # mid-step, mid-evaluation or mid-checkpoint-write (one is written every ~30 ms)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if any(read_torch_file(p)["step"] > done for p in complete_checkpoints(out)):
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:  # it ended by itself: it failed, or the drill outran the run
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        reached.append(max(read_torch_file(p)["step"] for p in complete_checkpoints(out)))
    final = run_cli(*train_args(corpus, out, *steps, "--resume", "auto"), timeout=1200)
    assert final.returncode == 0, final.stderr
    a, b = final_weights(straight), final_weights(out)
    exact = all(torch.equal(a[k], b[k]) for k in a)
    with capsys.disabled():
        print(f"\n[drill] kill -9: {kills} kills, the newest checkpoint then at steps {reached}; resumed to"
              f" step 300: final weights bit-identical to an uninterrupted run: {exact}")  # fmt: skip
    assert kills == KILLS and exact


def test_kill_9_during_prepare_leaves_nothing_that_passes_for_a_cache(tmp_path, cli):
    (tmp_path / "big").mkdir()
    for i in range(30):
        (tmp_path / "big" / f"{i}.txt").write_text(make_text(60000, i))
    cache = tmp_path / "cache"
    args = ["prepare", "--data", str(tmp_path / "big"), "--cache-dir", str(cache)]
    proc = launch(args)
    deadline = time.time() + 60
    while not list(cache.glob("*.tmp-*")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not [p for p in cache.iterdir() if (p / "manifest.json").exists()]  # nothing complete-looking
    again = cli(*args)  # in this process: what is left is judged by the same code a new run uses
    assert again.returncode == 0 and "token cache" in again.stdout, again.stderr
    assert not list(cache.glob("*.tmp-*"))  # the killed run's leftovers are cleaned up


def corrupt(kind, good, path, tmp_path):
    raw = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "random-bytes":
        path.write_bytes(random.Random(1).randbytes(len(raw)))
    elif kind == "zip-missing-entry":
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
            for item in src.infolist():
                if not item.filename.endswith("data.pkl"):
                    dst.writestr(item, src.read(item.filename))
    elif kind == "other-architecture":
        torch.save({"format": "examplegpt-checkpoint", "model": {"w": torch.zeros(3)},
                    "model_config": {"d_model": 64, "num_heads": 5}}, path)  # fmt: skip
    elif kind == "hostile":
        marker = tmp_path / "PWNED"

        class Hostile:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"model": Hostile(), "model_config": {}}, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from examplegpt.cli import main

    base = tmp_path_factory.mktemp("trained")
    (base / "corpus.txt").write_text(make_text(6000, 5))
    out = base / "run"
    assert main(train_args(base / "corpus.txt", out, "--max-steps", "2", "--checkpoint-interval", "2")) == 0
    return base, out


@pytest.mark.parametrize("kind", ["truncated", "random-bytes", "zip-missing-entry", "other-architecture", "hostile"])
@pytest.mark.parametrize("command", ["generate", "evaluate", "train-resume"])
def test_bad_checkpoints_are_refused_in_one_line_and_left_untouched(trained, tmp_path, kind, command, cli):
    base, out = trained
    good = out / "checkpoints" / "checkpoint_epoch1_batch2.pt"
    bad_dir = tmp_path / "run"
    (bad_dir / "checkpoints").mkdir(parents=True)
    bad = bad_dir / "checkpoints" / "checkpoint_epoch1_batch2.pt"
    corrupt(kind, good, bad, tmp_path)
    before = hashlib.sha256(bad.read_bytes()).hexdigest()
    if command == "generate":  # in this process: the same main() a user runs, without starting Python 15 times
        proc = cli("generate", "-c", str(bad), "-p", "hi")
    elif command == "evaluate":
        proc = cli("evaluate", "-c", str(bad), "--data", str(base / "corpus.txt"))
    else:
        proc = cli(*train_args(base / "corpus.txt", bad_dir, "--resume", "auto"))
    assert_one_line_error(proc, "checkpoint_epoch1_batch2.pt")
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == before
    assert not (tmp_path / "PWNED").exists()


BAD_INPUT = {
    "train": [["--batch-size", "0"], ["--batch-size", "x"], ["--learning-rate", "-1"], ["--max-steps", "0"],
              ["--num-heads", "5"], ["--dropout", "1.5"], ["--precision", "fp8"], ["--device", "tpu"],
              ["--warmup-steps", "-1"], ["--data", "/no/such.txt"], ["--init-from", "/no/such.pt"],
              ["--config", "/no/such.toml"], ["--resume", "/no/such.pt"], ["--val-fraction", "0.9"],
              ["--micro-batch-size", "3"], ["--keep-last", "0"], ["--workers", "0"], ["--preset", "9B"]],
    "generate": [["-n", "0"], ["-n", "x"], ["-t", "-0.5"], ["--top-p", "-0.1"], ["--top-p", "2"], ["--top-k", "-1"],
                 ["--min-p", "2"], ["--repetition-penalty", "0"], ["--num-samples", "0"], ["--dtype", "int4"],
                 ["--device", "tpu"], ["-c", "/no/such.pt"], ["-c", "/"], ["-p", ""]],
    "evaluate": [["--stride", "0"], ["--stride", "100000"], ["--batch-size", "0"], ["-c", "/no/such.pt"],
                 ["--data", "/no/such.txt"], ["--device", "tpu"]],
    "prepare": [["--data", "/no/such.txt"], ["--val-fraction", "0"], ["--workers", "-2"], ["--data", "/no/such/folder/"]],
    "export": [["-c", "/no/such.pt"]],
    "plot": [["/no/such/run"]],
}  # fmt: skip


def test_bad_input_on_every_command_is_one_line(trained, tmp_path, capsys, cli):
    base, out = trained
    model = str(out / "gpt_model.pt")
    defaults = {
        "train": train_args(base / "corpus.txt", tmp_path / "run")[1:],
        "generate": ["-c", model, "-p", "hi"],
        "evaluate": ["-c", model, "--data", str(base / "corpus.txt")],
        "prepare": ["--cache-dir", str(tmp_path / "cache")],
        "export": ["--out-dir", str(tmp_path / "hf")],
        "plot": [],
    }
    cases = 0
    for command, bad_flags in BAD_INPUT.items():
        for flags in bad_flags:
            proc = cli(command, *defaults[command], *flags)  # in this process: the same main() a user runs
            assert proc.returncode != 0, (command, flags)
            assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, (command, flags)
            cases += 1
    with capsys.disabled():
        print(f"\n[drill] bad input: {cases} cases over {len(BAD_INPUT)} commands, each one line and non-zero")


def every_typed_flag():
    """(command, flag) for every flag generated from a config field that takes a number."""
    import dataclasses

    from examplegpt.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for command, parser in commands.items():
        for action in parser._actions:
            kind = getattr(action.type, "__name__", None)
            if kind in ("int", "float") and action.option_strings:
                yield command, action.option_strings[0]
    assert dataclasses  # the flags come from the dataclasses in config.py


@pytest.mark.parametrize("command, flag", list(every_typed_flag()))
def test_every_numeric_flag_rejects_a_word_in_one_line(command, flag, capsys):
    from examplegpt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, flag, "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0]


def test_prompts_with_control_characters_and_unicode(trained, cli):
    _, out = trained
    model = str(out / "gpt_model.pt")
    for prompt in ["\x00\x07\x1b[31m tab\tbell", "naïve 東京 🚀 <|endoftext|>", "\n"]:  # through stdin: argv has no NUL
        proc = cli("generate", "-c", model, "-p", "-", "-n", "3", "-t", "0", "--ignore-eos", stdin=prompt)
        assert proc.returncode == 0 and proc.stdout.startswith(prompt), proc.stderr
