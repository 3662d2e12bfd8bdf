"""Model weights in and out: our model files and checkpoints, and Hugging Face GPT-2 folders.

Torch files are written atomically (`atomic_torch_save`, also used for checkpoints) and read
back with `read_torch_file`; `checkpoint.py` builds on both, so this module imports none of it.

Nothing here can execute code from a file: torch files are read with `weights_only=True`, and
Hugging Face weights through safetensors (or `weights_only=True` for pytorch_model.bin).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig, build, check_type
from .errors import UserError
from .model import GPT

MODEL_FORMAT = "examplegpt-model"

# Hugging Face's GPT-2 stores these four matmuls as Conv1D, whose weight is (in, out): transpose them.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill at any moment leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a torch file that holds only tensors and plain data; anything else is a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such file: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a model file")
    try:
        if not looks_like_torch_file(path):  # a text file, say: torch.load would only report its first byte
            if path.suffix == ".safetensors":
                raise UserError(f"{path} is a safetensors file: pass the Hugging Face GPT-2 folder that holds it")
            raise UserError(
                f"{path} is not a model file (neither a PyTorch checkpoint nor a Hugging Face GPT-2 folder)"
            )
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = "it holds Python objects that could run code; refused" if "Weights only" in str(e) else "corrupt"
        raise UserError(f"{path} is not a valid ExampleGPT checkpoint or model file ({reason})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError, TypeError):
        raise UserError(
            f"{path} is not a valid ExampleGPT checkpoint or model file (unreadable or truncated)"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(obj, dict) or "model" not in obj or "model_config" not in obj:
        raise UserError(f"{path} is not a valid ExampleGPT checkpoint or model file (no model weights in it)")
    if not isinstance(obj["model_config"], dict):
        kind = type(obj["model_config"]).__name__
        raise UserError(
            f"{path} is not a valid ExampleGPT checkpoint or model file (its model_config is a {kind}, not a dict)"
        )
    weights = obj["model"]
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise UserError(
            f"{path} is not a valid ExampleGPT checkpoint or model file (its model weights are not a dict of tensors)"
        )
    return obj


def looks_like_torch_file(path: Path) -> bool:
    """Whether the file starts as torch.save writes one: a zip archive, or (before PyTorch 1.6) a pickle.
    An empty file passes, to be reported as truncated."""
    with open(path, "rb") as f:
        start = f.read(4)
    return not start or start.startswith(b"PK\x03\x04") or start.startswith(b"\x80")


def model_from_state(state: dict, path: str | Path) -> GPT:
    """Build a GPT from the `model_config` and `model` entries of one of our files."""
    try:
        config = build(GPTConfig, state["model_config"])
    except UserError as e:
        raise UserError(f"{path} is not a valid ExampleGPT model: its config says {e}") from None
    model = GPT(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or ["weights do not match the model"]
        raise UserError(f"{path}: weights do not match its config ({first[0].strip()[:120]})") from None
    return model


def save_model_file(model: GPT, path: str | Path, extra: dict | None = None, weights: dict | None = None) -> None:
    """Write the final model (weights + config) atomically: `gpt_model.pt`.

    `weights` replaces model.state_dict() where the parameters are sharded (FSDP gathers them first)."""
    weights = model.state_dict() if weights is None else weights
    state = {"format": MODEL_FORMAT, "model_config": asdict(model.config), "model": weights}
    state.update(extra or {})
    atomic_torch_save(state, path)


def load_model(path: str, map_location: str | torch.device = "cpu") -> GPT:
    """A GPT from our model file or checkpoint, a Hugging Face GPT-2 folder, or a hub id (online only)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (p / "gpt_model.pt").exists():
        raise UserError(f"{path} is a training run's folder: pass its model file, {p / 'gpt_model.pt'}")
    if p.is_dir():
        return load_hf_folder(p)
    if p.exists():
        return model_from_state(read_torch_file(p, map_location), p)
    if looks_like_hub_id(path):
        return load_hf_folder(download_from_hub(path))
    raise UserError(
        f"no such file or folder: {path} (train a model with `python example.py train`,"
        " or pass -c a model file or a Hugging Face GPT-2 folder)"
    )


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.endswith((".pt", ".bin", ".safetensors"))


def download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline, unknown repo, gated, ...: all end the same way for the user
        raise UserError(
            f"cannot get '{repo_id}' from the Hugging Face hub ({type(e).__name__}); "
            "offline, pass a local folder with config.json and model.safetensors instead"
        ) from None
    return Path(folder)


# Every GPT2Config field that changes what GPT2LMHeadModel computes, and the values our model computes
# exactly. reorder_and_upcast_attn only changes the order and precision of the attention products: in
# float32 (how weights are loaded) it is the same computation.
SUPPORTED_HF_VALUES: dict[str, tuple] = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "tie_word_embeddings": (True,),
    "add_cross_attention": (False,),
    "reorder_and_upcast_attn": (False, True),
}
# What transformers' GPT2Config takes for a field config.json leaves out (the hub's own gpt2 config.json,
# and folders saved by transformers 4.x, have no tie_word_embeddings).
HF_DEFAULTS: dict[str, object] = {
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "tie_word_embeddings": True,
    "add_cross_attention": False,
    "reorder_and_upcast_attn": False,
}


def config_from_hf(hf: dict) -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 config.json, refusing variants our model does not compute
    (a vocab_size below the tokenizer's is refused by GPTConfig itself)."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"model_type is {hf.get('model_type')!r}: only GPT-2 folders can be loaded")
    for name, supported in SUPPORTED_HF_VALUES.items():
        value = hf.get(name, HF_DEFAULTS[name])
        if value not in supported:
            raise UserError(
                f"{name}={json.dumps(value)} is not supported (this GPT-2 computes only {name}="
                f"{' or '.join(json.dumps(v) for v in supported)})"
            )
    for name in ("vocab_size", "n_embd", "n_head", "n_layer", "n_positions"):
        check_type(name, hf[name], "int")
    check_type("n_inner", hf.get("n_inner"), "int | None")
    d_model = hf["n_embd"]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        num_heads=hf["n_head"],
        num_layers=hf["n_layer"],
        d_ff=hf.get("n_inner") or 4 * d_model,
        max_seq_len=hf["n_positions"],
        dropout=0.0,
    )


def config_to_hf(config: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_embd": config.d_model,
        "n_head": config.num_heads,
        "n_layer": config.num_layers,
        "n_inner": config.d_ff,
        "n_positions": config.max_seq_len,
        "n_ctx": config.max_seq_len,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
    }


def load_hf_folder(folder: Path) -> GPT:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise UserError(f"{folder} is not a Hugging Face GPT-2 folder (no config.json)")
    config = read_hf_config(config_file)
    safetensors, pickled = folder / "model.safetensors", folder / "pytorch_model.bin"
    if not safetensors.exists() and not pickled.exists():
        raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")
    try:
        if safetensors.exists():
            hf_state = load_file(safetensors)
        else:
            hf_state = torch.load(pickled, map_location="cpu", weights_only=True)
        model = GPT(config)
        model.load_state_dict(state_from_hf(hf_state, config), strict=True)
    except Exception as e:  # corrupt file, missing or misshapen tensors: all mean "not these weights"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{folder}: the weights cannot be loaded as GPT-2 ({reason})") from None
    return model


def read_hf_config(config_file: Path) -> GPTConfig:
    """Our GPTConfig from a config.json; a file that is unreadable, not a GPT-2 config or a variant our
    model does not compute is one line naming the file."""
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))  # JSON is UTF-8, as transformers reads it
    except UnicodeDecodeError:
        raise UserError(f"{config_file} is not a GPT-2 config (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not a GPT-2 config (invalid JSON: {e})") from None
    except OSError as e:
        raise UserError(f"cannot read {config_file}: {e.strerror or e}") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{config_file} is not a GPT-2 config (it holds {json.dumps(hf_config)[:40]}, not an object)")
    try:
        return config_from_hf(hf_config)
    except KeyError as e:
        raise UserError(f"{config_file} is not a GPT-2 config (no {e} in it)") from None
    except UserError as e:
        raise UserError(f"{config_file}: {e}") from None


def state_from_hf(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Map a GPT2LMHeadModel (or GPT2Model) state dict onto our parameter names and padded vocab."""
    state = {}
    for key, tensor in hf_state.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old HF files
            continue
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        state[name] = tensor.contiguous()
    wte = state["transformer.wte.weight"]  # (vocab_size, C): pad the rows up to the model's size
    padded = wte.new_zeros(config.padded_vocab_size, config.d_model)
    padded[: config.vocab_size] = wte
    state["transformer.wte.weight"] = padded
    state["lm_head.weight"] = padded  # tied
    return state


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face GPT-2 names and layouts (no tied lm_head copy, no vocab padding)."""
    hf_state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            tensor = tensor[: model.config.vocab_size]
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        hf_state[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return hf_state


def save_hf_folder(model: GPT, folder: Path) -> None:
    """Write config.json + model.safetensors that transformers' GPT2LMHeadModel.from_pretrained reads."""
    tmp = folder / "model.safetensors.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
        save_file(state_to_hf(model), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / "model.safetensors")
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write to the output folder {folder}: {reason}") from None
