"""Configuration: flags generated from the dataclasses, config files, precedence, validation."""

import argparse

import pytest

from examplegpt.cli import build_parser, resolve
from examplegpt.config import DataConfig, GenerateConfig, GPTConfig, TrainConfig, field_docs
from examplegpt.errors import UserError

from .conftest import REPO, assert_one_line_error

CLASSES = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}


def parse(*argv: str) -> dict:
    return resolve(build_parser().parse_args(["train", *argv]), CLASSES)


def test_defaults_are_the_original_readme_values():
    train = parse()["train"]
    assert (train.num_epochs, train.batch_size, train.learning_rate, train.warmup_steps) == (3, 64, 1e-4, 100)
    assert train.use_amp and train.use_checkpointing and not train.use_wandb
    assert train.wandb_project == "gpt-training" and train.checkpoint_interval == 500
    model = parse()["model"]
    assert (model.d_model, model.num_heads, model.num_layers, model.d_ff, model.max_seq_len) == (
        768,
        12,
        12,
        3072,
        1024,
    )


def test_every_field_has_a_flag_with_its_docstring_as_help():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for cls in CLASSES.values():
        for name, doc in field_docs(cls).items():
            assert "--" + name.replace("_", "-") in help_text
            assert doc.split()[0] in help_text
    assert set(field_docs(GenerateConfig)) == set(GenerateConfig.__dataclass_fields__)


def test_flags_aliases_and_negations():
    configs = parse("--num-layers", "6", "--learning-rate", "3e-4", "--no-amp", "--no-checkpointing", "--wandb",
                    "--micro-batch-size", "auto", "--max-steps", "none")  # fmt: skip
    assert configs["model"].num_layers == 6 and configs["train"].learning_rate == 3e-4
    assert not configs["train"].use_amp and not configs["train"].use_checkpointing and configs["train"].use_wandb
    assert configs["train"].micro_batch_size is None and configs["train"].max_steps is None


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_sets_fields_and_flags_win(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        path.write_text('preset = "tiny"\n[train]\nlearning_rate = 0.001\nbatch_size = 32\n[model]\ndropout = 0.1\n')
    else:
        path.write_text("preset: tiny\ntrain:\n  learning_rate: 0.001\n  batch_size: 32\nmodel:\n  dropout: 0.1\n")
    configs = parse("--config", str(path), "--batch-size", "16")
    assert configs["model"].d_model == 192 and configs["model"].dropout == 0.1  # preset, then the file
    assert configs["train"].learning_rate == 0.001 and configs["train"].batch_size == 16  # the flag wins


@pytest.mark.parametrize(
    "content, message",
    [
        ("learning_rat = 0.1\n", "unknown setting 'learning_rat'"),
        ('batch_size = "big"\n', "batch_size must be int"),
        ("use_amp = 1\n", "use_amp must be bool"),
        ("num_heads = 5\n", "divisible by num_heads"),
        ("batch_size = [\n", "cannot parse"),
    ],
)
def test_config_file_errors(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        parse("--config", str(path))


SHARED_FILE = """
checkpoint = "runs/x/gpt_model.pt"  # flat: generate's, evaluate's and serve's
[model]
d_model = 64
num_heads = 2
[data]
data = "shakespeare"
[train]
batch_size = 6
[generate]
temperature = 0.5
[evaluate]
stride = 32
[serve]
port = 9000
"""


def resolved(command: str, classes: dict, path) -> dict:
    args = build_parser().parse_args([command, "--config", str(path)])
    return {name: vars(config) for name, config in resolve(args, classes).items()}


def test_one_config_file_serves_every_command_each_taking_its_own_settings(tmp_path):
    """prepare, train, evaluate, generate and serve read one file: each takes its own sections and flat
    settings and skips the others' (before, the shipped quick-start file was refused by prepare)."""
    from examplegpt.config import EvaluateConfig, ServeConfig

    path = tmp_path / "shared.toml"
    path.write_text(SHARED_FILE)
    train = resolved("train", {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}, path)
    assert train["model"]["d_model"] == 64 and train["train"]["batch_size"] == 6
    prepare = resolved("prepare", {"model": GPTConfig, "data": DataConfig}, path)
    assert prepare["data"]["data"] == "shakespeare"
    evaluate = resolved("evaluate", {"evaluate": EvaluateConfig, "data": DataConfig}, path)
    assert evaluate["evaluate"]["stride"] == 32 and evaluate["evaluate"]["checkpoint"] == "runs/x/gpt_model.pt"
    generate = resolved("generate", {"generate": GenerateConfig}, path)["generate"]
    assert generate["temperature"] == 0.5 and generate["checkpoint"] == "runs/x/gpt_model.pt"
    serve = resolved("serve", {"serve": ServeConfig}, path)["serve"]
    assert serve["port"] == 9000 and serve["checkpoint"] == "runs/x/gpt_model.pt"


def test_the_shipped_quick_start_file_prepares_its_data(cli, tmp_path):
    proc = cli("prepare", "--config", str(REPO / "configs" / "shakespeare.toml"), "--cache-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        ("[generate]\ntemprature = 0.5\n", "unknown setting 'temprature'"),  # in a section this command skips
        ("[evaluation]\nstride = 32\n", "unknown section \\[evaluation\\]"),
    ],
)
def test_what_no_command_takes_is_still_an_error(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        resolved("train", {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}, path)


@pytest.mark.parametrize("content, batch_size", [("train:\n", 64), ("model:\ndata:\ntrain:\n  batch_size: 16\n", 16)])
def test_an_empty_yaml_section_sets_nothing(tmp_path, content, batch_size):
    """YAML reads `train:` with nothing under it as None: it was refused as "unknown setting 'train'"."""
    path = tmp_path / "run.yaml"
    path.write_text(content)
    configs = resolved("train", {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}, path)
    assert configs["model"] == vars(GPTConfig()) and configs["data"] == vars(DataConfig())
    assert configs["train"] == vars(TrainConfig(batch_size=batch_size))


# `data` is also a setting (a name): `data: 3` is that setting, of the wrong type, but a list is never a name
@pytest.mark.parametrize(
    "section, suffix, value",
    [("train", ".yaml", "[]"), ("train", ".yaml", "3"), ("train", ".toml", "3"), ("data", ".yaml", "[]")],
)
@pytest.mark.parametrize("command", ["train", "generate"])  # generate has no [data]: still the same error
def test_a_section_that_is_not_a_table_is_one_line(cli, tmp_path, suffix, value, section, command):
    path = tmp_path / f"run{suffix}"
    path.write_text(f"{section}: {value}\n" if suffix == ".yaml" else f"{section} = {value}\n")
    table = "mapping" if suffix == ".yaml" else "table"
    proc = cli(command, "--config", str(path))
    assert_one_line_error(proc, f"the section [{section}] must be a {table} of settings")


@pytest.mark.parametrize(
    "file, content",
    [("run.yaml", "model:\n  train:\n    max_steps: 3\n"), ("run.toml", "[train.model]\nd_model = 64\n")],
)
def test_a_section_inside_a_section_is_one_line(cli, tmp_path, file, content):
    path = tmp_path / file
    path.write_text(content)
    assert_one_line_error(cli("train", "--config", str(path)), "is inside [")


def test_a_list_of_tables_for_data_is_refused_by_every_command(cli, tmp_path):
    """TOML's [[data]] was read as the setting data = [{...}]: a type error without the file's name for
    train and evaluate, and taken silently by generate and serve."""
    path = tmp_path / "run.toml"
    path.write_text("[[data]]\nval_fraction = 0.1\n")
    for command in ("train", "evaluate", "generate"):
        assert_one_line_error(cli(command, "--config", str(path)), "the section [data] must be a table of settings")


@pytest.mark.parametrize(
    "command, file, content, words",
    [
        ("generate", "run.yaml", "stop:\n  a: 1\n", "stop is a setting, not a section: it takes list[str], not a mapping"),
        ("generate", "run.toml", "[temperature]\na = 1\n", "temperature is a setting, not a section: it takes float, not a table"),
        ("train", "run.yaml", "train:\n  max_steps: {a: 1}\n", "max_steps is a setting, not a section: it takes int or None"),
        ("train", "run.yaml", "max_tokens: {a: 1}\n", "max_tokens is a setting"),  # an earlier name, another command's
    ],
)  # fmt: skip
def test_a_table_under_a_settings_name_says_the_setting_takes_a_value(cli, tmp_path, command, file, content, words):
    """`stop:` with a mapping under it was called an unknown section [stop], though stop is a setting."""
    path = tmp_path / file
    path.write_text(content)
    assert_one_line_error(cli(command, "--config", str(path)), words)


def test_nan_is_refused_in_a_config_file(tmp_path):
    from examplegpt.config import ServeConfig

    path = tmp_path / "serve.yaml"
    path.write_text("checkpoint: m.pt\nserve:\n  drain_seconds: .nan\n")
    with pytest.raises(UserError, match="drain_seconds must be a number, got nan"):
        resolved("serve", {"serve": ServeConfig}, path)


def test_nan_is_refused_in_one_line_on_the_command_line(cli):
    """--drain-seconds nan passed the `< 0` check; on SIGTERM the drain then failed with a traceback."""
    assert_one_line_error(cli("serve", "-c", "none.pt", "--drain-seconds", "nan"), "drain_seconds must be a number")


def test_config_file_errors_reach_the_user_as_one_line(cli, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("dropout = 2.0\n")
    assert_one_line_error(cli("train", "--config", str(path)), "dropout")
    assert_one_line_error(cli("train", "--config", str(tmp_path / "missing.toml")), "not found")


def test_unknown_command_and_flag_are_one_line(cli):
    assert_one_line_error(cli("frobnicate"), "invalid choice")
    assert_one_line_error(cli("train", "--num-layer", "3"), "unrecognized")
    assert cli("train", "--help").returncode == 0


def test_config_namespace_rejects_stray_values():
    with pytest.raises(UserError, match="unknown GPTConfig setting"):
        from examplegpt.config import build

        build(GPTConfig, {"layers": 3})
    assert isinstance(build_parser().parse_args(["generate", "-p", "x"]), argparse.Namespace)


def parse_generate(*argv: str) -> GenerateConfig:
    return resolve(build_parser().parse_args(["generate", *argv]), {"generate": GenerateConfig})["generate"]


def test_the_seed_flags_still_work_under_one_vocabulary(tmp_path):
    # the original README: generate --prompt --max-tokens --temperature --top-p --checkpoint
    cfg = parse_generate("--prompt", "Hi", "--max-tokens", "7", "--temperature", "0.5", "--top-p", "0.8",
                         "--checkpoint", "m.pt", "--dtype", "bfloat16")  # fmt: skip
    assert (cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.checkpoint) == ("Hi", 7, 0.5, 0.8, "m.pt")
    assert cfg.precision == "bf16"  # torch's name, said in training's words
    assert parse_generate("-n", "3", "--precision", "fp16").max_new_tokens == 3
    old_file = tmp_path / "generate.toml"
    old_file.write_text('max_tokens = 9\ndtype = "float32"\n')  # the keys a config file used before
    cfg = parse_generate("--config", str(old_file))
    assert cfg.max_new_tokens == 9 and cfg.precision == "fp32"
    assert parse("--precision", "bfloat16")["train"].precision == "bf16"


def test_use_amp_and_precision_say_one_thing():
    off = parse("--no-amp")["train"]
    assert (off.use_amp, off.precision) == (False, "fp32")
    fp32 = parse("--precision", "fp32")["train"]
    assert (fp32.use_amp, fp32.precision) == (False, "fp32")
    assert parse("--amp", "--precision", "bf16")["train"].precision == "bf16"
    with pytest.raises(UserError, match="--no-amp"):
        parse("--no-amp", "--precision", "bf16")


@pytest.mark.parametrize("command", ["train", "generate", "evaluate"])
def test_every_command_checks_the_device_and_precision_words_alike(cli, command):
    device = cli(command, "--device", "tpu")
    assert_one_line_error(device, "device must be auto, cpu, cuda or mps, got 'tpu'")
    precision = cli(command, "--precision", "fp8")
    choices = "auto, fp32, bf16 or fp16" if command == "train" else "auto, fp32, bf16, fp16 or int8"  # int8: inference
    assert_one_line_error(precision, f"precision must be {choices}, got 'fp8'")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--learning-rate", "nan"),
        ("--learning-rate", "inf"),
        ("--beta1", "nan"),
        ("--beta1", "1.5"),
        ("--beta2", "-0.1"),
        ("--weight-decay", "nan"),
        ("--grad-clip", "nan"),
    ],
)
def test_optimizer_settings_out_of_range_or_nan_are_refused_naming_the_field(flag, value):
    """Each would otherwise reach torch.optim as a traceback, or train on NaN without a word."""
    with pytest.raises(UserError, match=flag.removeprefix("--").replace("-", "_")):
        parse(flag, value)
