"""Our GPT computes exactly what Hugging Face's GPT2LMHeadModel computes, on the same weights."""

import json

import pytest
import torch

from examplegpt.generate import generate
from examplegpt.weights import load_model, save_hf_folder, state_to_hf

from .conftest import assert_one_line_error

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(hf_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = load_model(str(hf_dir)).eval()
    return hf, ours


def test_logits_and_loss_match_transformers(models):
    hf, ours = models
    torch.manual_seed(1)
    idx = torch.randint(0, 50257, (3, 64))
    with torch.no_grad():
        expected = hf(idx, labels=idx)
        logits, _ = ours(idx)
        _, loss = ours(idx[:, :-1], targets=idx[:, 1:])  # HF shifts the labels itself
    assert (logits - expected.logits).abs().max().item() < 1e-4
    assert loss.item() == pytest.approx(expected.loss.item(), abs=1e-5)


def test_greedy_generation_matches_transformers(models):
    hf, ours = models
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 40, temperature=0), expected)


def test_cli_greedy_prints_what_transformers_generates(cli, hf_dir, models):
    hf, _ = models
    from examplegpt.tokenizer import decode, encode

    prompt = "The history of"
    ids = torch.tensor([encode(prompt)])
    expected = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    proc = cli("generate", "-c", str(hf_dir), "-p", prompt, "-n", "20", "-t", "0", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == decode(expected[0].tolist()) + "\n"


def test_export_round_trip_is_identity_and_loads_in_transformers(models, tmp_path):
    _, ours = models
    save_hf_folder(ours, tmp_path / "export")
    reloaded_hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    back = load_model(str(tmp_path / "export"))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (reloaded_hf(idx).logits - ours(idx)[0]).abs().max().item() < 1e-4
    assert set(state_to_hf(ours)) <= set(reloaded_hf.state_dict())


def test_pytorch_model_bin_folders_load_too(models, tmp_path):
    hf, ours = models
    hf.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").exists() or list(tmp_path.glob("*.safetensors"))
    loaded = load_model(str(tmp_path))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_hub_id_offline_is_one_line(cli):
    proc = cli("generate", "-c", "gpt2", "-p", "hi")
    assert_one_line_error(proc, "cannot get 'gpt2' from the Hugging Face hub")


def test_corrupt_hugging_face_weights_are_one_line(cli, hf_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert_one_line_error(cli("generate", "-c", str(broken), "-p", "hi"), "cannot be loaded as GPT-2")


# Every GPT2Config field that changes what GPT2LMHeadModel computes: supported exactly, or refused in one line.
SUPPORTED = [
    {},
    {"n_inner": 48},
    {"activation_function": "gelu_pytorch_tanh"},
    {"reorder_and_upcast_attn": True},
    {"layer_norm_epsilon": 1e-5},
    {"vocab_size": 50304},
    {"add_cross_attention": False, "scale_attn_weights": True, "tie_word_embeddings": True},
]
REFUSED = [
    {"tie_word_embeddings": False},
    {"scale_attn_weights": False},
    {"scale_attn_by_inverse_layer_idx": True},
    {"add_cross_attention": True},
    {"activation_function": "gelu"},
    {"activation_function": "relu"},
    {"layer_norm_epsilon": 1e-6},
    {"vocab_size": 1000},
]


def tiny_hf_folder(folder, **overrides):
    values = dict(vocab_size=50257, n_embd=32, n_head=2, n_layer=2, n_positions=32, initializer_range=0.2)
    values.update(overrides)
    config = transformers.GPT2Config(**values)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("overrides", SUPPORTED, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "gpt2")
def test_supported_config_fields_compute_what_transformers_computes(overrides, tmp_path):
    hf = tiny_hf_folder(tmp_path, **overrides)
    ours = load_model(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("overrides", REFUSED, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_unsupported_config_fields_are_refused_in_one_line_naming_the_field(overrides, tmp_path):
    from examplegpt.errors import UserError

    tiny_hf_folder(tmp_path, **overrides)
    with pytest.raises(UserError) as refused:
        load_model(str(tmp_path))
    message = str(refused.value)
    assert "\n" not in message and next(iter(overrides)) in message


def test_a_config_without_tie_word_embeddings_is_tied_as_transformers_reads_it(tmp_path):
    """The hub's own gpt2 config.json and transformers 4.x folders leave the key out: GPT2Config's default is True."""
    tiny_hf_folder(tmp_path)
    config_file = tmp_path / "config.json"
    hf_config = json.loads(config_file.read_text())
    del hf_config["tie_word_embeddings"]
    config_file.write_text(json.dumps(hf_config))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ours = load_model(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
