"""Model files that are not what they should be are one line naming the file, never a traceback."""

from dataclasses import asdict

import pytest
import torch

from examplegpt import GPT
from examplegpt.weights import MODEL_FORMAT, save_hf_folder, save_model_file

from .conftest import assert_one_line_error, tiny_config


@pytest.fixture(scope="module")
def micro_model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(d_model=32, num_heads=2, num_layers=1, d_ff=64, max_seq_len=32)).eval()


def hf_folder_whose_config(tmp_path, model, content: bytes | None):
    """A Hugging Face folder from `model` whose config.json holds `content` (None: is a directory)."""
    save_hf_folder(model, tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config_file.unlink()
    if content is None:
        config_file.mkdir()
    else:
        config_file.write_bytes(content)
    return tmp_path / "hf", config_file


def model_file_with(tmp_path, gpt, **entries):
    """One of our model files with some of its entries replaced."""
    state = {"format": MODEL_FORMAT, "model_config": asdict(gpt.config), "model": gpt.state_dict(), **entries}
    torch.save(state, tmp_path / "model.pt")
    return tmp_path / "model.pt", tmp_path / "model.pt"


MALFORMED = {
    "config.json is []": lambda tmp, m: hf_folder_whose_config(tmp, m, b"[]"),
    "config.json is null": lambda tmp, m: hf_folder_whose_config(tmp, m, b"null"),
    "config.json is UTF-16": lambda tmp, m: hf_folder_whose_config(tmp, m, b"\xff\xfe{"),
    "config.json is a folder": lambda tmp, m: hf_folder_whose_config(tmp, m, None),
    "model_config is a string": lambda tmp, m: model_file_with(tmp, m, model_config="d_model=32"),
    "model is a list": lambda tmp, m: model_file_with(tmp, m, model=[1, 2]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_model_file_is_one_line_naming_it(case, cli, micro_model, tmp_path):
    model_path, bad_file = MALFORMED[case](tmp_path, micro_model)
    assert_one_line_error(cli("generate", "-c", str(model_path), "-p", "hi", "-n", "1"), "error:", str(bad_file))


def test_a_text_file_is_not_a_model_file_rather_than_unsafe(cli, tmp_path):
    (tmp_path / "train.toml").write_text("[train]\nmax_steps = 3\n")
    proc = cli("generate", "-c", str(tmp_path / "train.toml"), "-p", "hi", "-n", "1")
    assert_one_line_error(proc, "train.toml is not a model file")
    assert "could run code" not in proc.stderr


def test_export_to_a_folder_that_cannot_be_made_is_one_line(cli, micro_model, tmp_path):
    save_model_file(micro_model, tmp_path / "model.pt")
    (tmp_path / "afile").write_text("a file, so no folder can be made under it")
    out = tmp_path / "afile" / "x"
    proc = cli("export", "-c", str(tmp_path / "model.pt"), "--out", str(out))
    assert_one_line_error(proc, f"cannot write to the output folder {out}")
