"""Every setting of ExampleGPT, in typed dataclasses.

The docstring under each field is its `--help` text; the CLI flags and the config-file keys
are generated from these classes (see `cli.py`), so there is no second list to keep in step.
Values are validated on construction: a bad one raises `UserError` with one clear sentence.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .sampling import GENERATE_DEFAULTS, TOKEN_SETTINGS, SamplingParams, out_of_range

TOKENIZER_VOCAB_SIZE = 50257  # ids the GPT-2 tokenizer produces (50,000 merges + 256 bytes + <|endoftext|>)

# One vocabulary for every command: where a setting means the same thing, it has the same name and values.
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "muon")
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")  # int8: weight-only, for generate, evaluate and serve
# torch's dtype names for our precisions
PRECISION_SYNONYMS = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
RENAMED = {"max_tokens": "max_new_tokens", "dtype": "precision"}  # earlier config-file keys, still read


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")


def check_device(device: str) -> None:
    check_choice("device", device, DEVICES)


def precision_name(precision: str, choices: tuple[str, ...] = PRECISIONS) -> str:
    """The precision in our vocabulary (fp32, bf16, fp16, auto; int8 where `choices` has it); torch's names too,
    in any case."""
    name = precision.lower() if isinstance(precision, str) else precision
    name = PRECISION_SYNONYMS.get(name, name)
    if name not in choices:
        check_choice("precision", precision, choices)  # the error names what was given
    return name


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[node.target.id] = following.value.value
    # fields added from elsewhere (with_token_settings) bring their help with them
    docs.update({f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata})
    return docs


@dataclass
class GPTConfig:
    """The shape of the model. The defaults are GPT-2 small (124M parameters)."""

    vocab_size: int = TOKENIZER_VOCAB_SIZE
    """Number of tokens in the vocabulary: at least GPT-2's 50257 (more only adds rows that are never used)."""
    d_model: int = 768
    """Width of the residual stream (embedding size)."""
    num_heads: int = 12
    """Attention heads per layer; d_model must be divisible by it."""
    num_layers: int = 12
    """Number of transformer blocks."""
    d_ff: int = 3072
    """Hidden width of the feed-forward network (GPT-2: 4 * d_model)."""
    max_seq_len: int = 1024
    """Context length: the number of learned positions."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual branches (GPT-2 trained with 0.1)."""
    vocab_pad_multiple: int = 64
    """Embedding rows are padded to a multiple of this for faster matmuls; logits are cut back to vocab_size."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len", "vocab_pad_multiple"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_seq_len < 2:  # generation keeps half the context when it slides: a context of 1 keeps nothing
            raise UserError(f"max_seq_len must be at least 2, got {self.max_seq_len}")
        if self.vocab_size < TOKENIZER_VOCAB_SIZE:
            raise UserError(
                f"vocab_size must be at least {TOKENIZER_VOCAB_SIZE} (the ids of the GPT-2 tokenizer), got {self.vocab_size}"
            )
        if self.d_model % self.num_heads:
            raise UserError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m


# The GPT-2 family (Radford et al. 2019) and a model small enough to train on a laptop CPU.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=192, num_heads=6, num_layers=4, d_ff=768, max_seq_len=256),
    "124M": dict(d_model=768, num_heads=12, num_layers=12, d_ff=3072),
    "350M": dict(d_model=1024, num_heads=16, num_layers=24, d_ff=4096),
    "774M": dict(d_model=1280, num_heads=20, num_layers=36, d_ff=5120),
    "1558M": dict(d_model=1600, num_heads=25, num_layers=48, d_ff=6400),
}


@dataclass
class DataConfig:
    """Where the training text comes from and where its tokens are cached."""

    data: str = field(default="wikitext-103", metadata={"metavar": "SOURCE"})
    """Corpus: wikitext-103, wikitext-2, a Hugging Face dataset id, or local text files (a file, folder or glob)."""
    data_config: str | None = None
    """Configuration name of a Hugging Face dataset (wikitext-103 and wikitext-2 set their own)."""
    text_column: str = "text"
    """Column that holds the text in a Hugging Face dataset."""
    train_split: str = field(default="train", metadata={"training_only": True})
    """Name of the training split of a Hugging Face dataset."""
    val_split: str = "validation"
    """Name of the validation split; when the source has none, val_fraction is held out instead."""
    test_split: str = "test"
    """Name of the test split, tokenized when the source has one."""
    val_fraction: float = field(default=0.005, metadata={"training_only": True})
    """Share of the tokens held out for validation when the source has no validation split."""
    cache_dir: str = field(default="data", metadata={"metavar": "DIR"})
    """Folder of the token cache (one sub-folder per source and options)."""
    workers: int | None = field(default=None, metadata={"training_only": True})
    """Tokenizer threads (default: all cores)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise UserError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"workers must be at least 1, got {self.workers}")


@dataclass
class TrainConfig:
    """How to train. Names and defaults follow the original ExampleGPT README."""

    num_epochs: int = 3
    """Passes over the training tokens."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (default: run all epochs)."""
    batch_size: int = 64
    """Sequences per optimizer step, summed over micro-batches and data-parallel ranks."""
    micro_batch_size: int | None = None
    """Sequences per forward pass on one device ('auto' or none: the largest that fits, found at start)."""
    learning_rate: float = 1e-4
    """Peak learning rate, reached after the warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at learning_rate * min_lr_ratio."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to learning_rate."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matmul and embedding weights only."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    optimizer: str = "adamw"
    """adamw: AdamW for every parameter; muon: Muon for the blocks' weight matrices, AdamW (learning_rate, weight_decay, betas) for the embeddings, the tied LM head, biases and LayerNorms. Muon's Newton-Schulz runs in bf16 on GPUs and CPUs with native bf16, in float32 on other CPUs."""
    muon_learning_rate: float = 0.02
    """Muon's peak learning rate (same warmup and decay as learning_rate); a tall matrix's step is scaled by sqrt(rows / cols)."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum."""
    muon_weight_decay: float = 0.0
    """Muon's decoupled weight decay: each step multiplies the matrices by 1 - lr * muon_weight_decay."""
    use_amp: bool = field(default=True, metadata={"aliases": ("--amp",)})
    """Mixed precision in the format `precision` names; off is the same as precision=fp32."""
    precision: str = "auto"
    """auto, bf16, fp16 or fp32; auto: bf16 where the GPU has it, else fp16 with a gradient scaler; on CPU bf16 only with native bf16 (AVX512-BF16 or AMX) and d_model >= 256, else fp32."""
    use_checkpointing: bool = field(default=True, metadata={"aliases": ("--checkpointing",)})
    """Gradient checkpointing per transformer block: less memory for about a third more compute."""
    compile: bool = False
    """Compile the model with torch.compile."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state per block (FSDP2) instead of DDP."""
    device: str = "auto"
    """auto (CUDA, then Apple MPS, then CPU), cuda, mps or cpu."""
    eval_interval: int = 500
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_windows: int = 160
    """Validation windows (of max_seq_len tokens) per evaluation: a fixed, seeded set, the same whatever the micro-batch, processes or device."""
    log_interval: int = 10
    """Write a metrics line every this many steps."""
    checkpoint_interval: int = 500
    """Save a checkpoint every this many batches (optimizer steps)."""
    keep_last: int | None = None
    """Keep only the newest N checkpoints (default: keep all)."""
    out_dir: str = field(default=".", metadata={"metavar": "DIR"})
    """Where checkpoints/, gpt_model.pt, metrics.jsonl and loss.png go."""
    resume: str | None = field(default=None, metadata={"bare_flag": "auto", "metavar": "PATH"})
    """'auto' (also a bare --resume) for the newest checkpoint in out_dir/checkpoints, or a checkpoint path (default: a fresh run)."""
    init_from: str | None = field(default=None, metadata={"metavar": "PATH"})
    """Start from these weights (our checkpoint or a Hugging Face GPT-2 folder) with a fresh optimizer (default: random weights)."""
    use_wandb: bool = field(default=False, metadata={"aliases": ("--wandb",)})
    """Log to Weights & Biases (offline mode when there are no credentials or no network)."""
    wandb_project: str = "gpt-training"
    """Weights & Biases project name."""
    seed: int = 1337
    """Seed of the initial weights, the data order and dropout."""
    deterministic: bool = False
    """On CUDA, deterministic kernels and a fixed cuBLAS workspace (slower): the same bits from the same seed. CPU runs are bit-reproducible without it."""

    def __post_init__(self) -> None:
        positive = ("num_epochs", "batch_size", "eval_interval", "eval_windows", "log_interval", "checkpoint_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "micro_batch_size", "keep_last"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise UserError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        # Comparisons written so that NaN fails them too.
        if not 0.0 < self.learning_rate < math.inf:
            raise UserError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise UserError(f"warmup_steps must not be negative, got {self.warmup_steps}")
        if not 0.0 <= self.weight_decay < math.inf:
            raise UserError(f"weight_decay must be a number >= 0, got {self.weight_decay}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):  # AdamW alone runs on older torch
            raise UserError(
                f"optimizer muon needs torch.optim.Muon, in PyTorch 2.9 and later; this is PyTorch {torch.__version__}: "
                "upgrade it, or train with --optimizer adamw"
            )
        if not 0.0 < self.muon_learning_rate < math.inf:
            raise UserError(f"muon_learning_rate must be a positive number, got {self.muon_learning_rate}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise UserError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0.0 <= self.muon_weight_decay < math.inf:
            raise UserError(f"muon_weight_decay must be a number >= 0, got {self.muon_weight_decay}")
        if not self.grad_clip >= 0.0:
            raise UserError(f"grad_clip must be a number >= 0 (0 disables clipping), got {self.grad_clip}")
        self.precision = precision_name(self.precision)
        if not self.use_amp and self.precision not in ("auto", "fp32"):
            raise UserError(f"--no-amp computes in fp32, but precision is {self.precision}: pass one of the two")
        if not self.use_amp or self.precision == "fp32":  # the seed's switch and the precision say one thing
            self.use_amp, self.precision = False, "fp32"
        check_device(self.device)


def with_token_settings(after: str, defaults: dict[str, object], aliases: dict[str, tuple[str, ...]]):
    """A class decorator (under @dataclass) that adds SamplingParams' token settings as fields after the field
    `after`: their type, range and help as SamplingParams defines them, their default from `defaults` or its,
    and the flags' `aliases`."""

    def add(cls: type) -> type:
        docs = field_docs(SamplingParams)
        settings = {f.name: f for f in dataclasses.fields(SamplingParams) if f.name in TOKEN_SETTINGS}
        annotations = {}
        for name, hint in cls.__dict__["__annotations__"].items():
            annotations[name] = hint
            if name == after:
                for setting, f in settings.items():
                    annotations[setting] = f.type
                    default = defaults.get(setting, f.default)
                    metadata = {**f.metadata, "help": docs[setting], "aliases": aliases.get(setting, ())}
                    setattr(cls, setting, field(default=default, metadata=metadata))
        cls.__annotations__ = annotations
        return cls

    return add


@dataclass
@with_token_settings(after="max_new_tokens", defaults=GENERATE_DEFAULTS, aliases={"temperature": ("-t",)})
class GenerateConfig:
    """How to sample text from a trained model. The sampling settings (temperature, top_p, top_k, min_p,
    repetition_penalty, seed) are sampling.SamplingParams', added after max_new_tokens."""

    prompt: str = field(default="", metadata={"aliases": ("-p",), "metavar": "TEXT"})
    """Text to continue; '-' (or a piped stdin with no --prompt) reads it from stdin."""
    checkpoint: str = field(default="gpt_model.pt", metadata={"aliases": ("-c",), "metavar": "PATH"})
    """Our model file or checkpoint, a Hugging Face GPT-2 folder, or a hub id such as openai-community/gpt2 (online)."""
    max_new_tokens: int = field(default=50, metadata={"aliases": ("--max-tokens", "-n")})
    """Number of new tokens to generate."""
    num_samples: int = 1
    """Independent samples, generated together as one batch; with --seed S, sample j draws from seed S + j (as serve's n choices do), so sample 0 is the one-sample run's text."""
    ignore_eos: bool = False
    """Keep generating past <|endoftext|>."""
    stop: list[str] = field(default_factory=list)
    """Stop a sample when this text appears (repeatable)."""
    json: bool = False
    """Print one JSON object per sample instead of streaming text."""
    interactive: bool = False
    """Keep the model loaded and read prompts line by line from stdin."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""
    precision: str = field(default="auto", metadata={"aliases": ("--dtype",)})
    """The weights' format: auto, fp32, bf16, fp16 or int8 (weight-only, float32 activations). auto is bf16 on a CUDA GPU that has it, else fp32 (exact; on CPU int8 decodes faster but is not bit-exact, and evaluates at about fp32's speed: evaluation multiplies many rows at once)."""
    compile: bool = False
    """Compile the decode step with torch.compile (CUDA)."""
    fast_cpu: bool = True
    """On CPU, multiply by copies of the weights in faster layouts (packed, transposed, mkl_packed) where a trial finds them faster (cpu_inference.py); off: plain PyTorch."""
    verbose: bool = False
    """Print on stderr each weight shape's trial of the layouts (packed, transposed, mkl_packed against plain PyTorch) and its choice."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        for name in ("max_new_tokens", "num_samples"):  # past 2**62 PyTorch cannot even count the memory asked for
            if getattr(self, name) > 2**62:
                raise UserError(f"{name} must be at most 2**62 (no machine holds more), got {getattr(self, name)}")
        problem = out_of_range(self)  # the sampling settings' ranges
        if problem:
            raise UserError(problem)
        if self.num_samples < 1:
            raise UserError(f"num_samples must be at least 1, got {self.num_samples}")
        if "" in self.stop:  # it is found before the first character: every sample would be cut to nothing
            raise UserError("stop must not be empty")
        check_device(self.device)
        self.precision = precision_name(self.precision, INFERENCE_PRECISIONS)


@dataclass
class EvaluateConfig:
    """How to evaluate a model on a corpus split."""

    checkpoint: str = field(default="gpt_model.pt", metadata={"aliases": ("-c",), "metavar": "PATH"})
    """Our model file or checkpoint, a Hugging Face GPT-2 folder, or a hub id such as openai-community/gpt2 (online)."""
    split: str = "test"
    """Split to score: test, validation (val) or train; a local text file is scored whole."""
    stride: int | None = None
    """Tokens between window starts (default: half the context)."""
    batch_size: int = 8
    """Windows per forward pass."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""
    json: bool = False
    """Print one JSON object instead of the table."""
    precision: str = "auto"
    """The weights' format: auto, fp32, bf16, fp16 or int8 (weight-only, float32 activations). auto is bf16 on a CUDA GPU that has it, else fp32 (exact; on CPU int8 decodes faster but is not bit-exact, and evaluates at about fp32's speed: evaluation multiplies many rows at once)."""
    fast_cpu: bool = True
    """On CPU, multiply by copies of the weights in faster layouts (packed, transposed, mkl_packed) where a trial finds them faster (cpu_inference.py); off: plain PyTorch."""
    verbose: bool = False
    """Print on stderr each weight shape's trial of the layouts (packed, transposed, mkl_packed against plain PyTorch) and its choice."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")
        check_device(self.device)
        self.precision = precision_name(self.precision, INFERENCE_PRECISIONS)


@dataclass
class ServeConfig:
    """How to serve a model over HTTP (OpenAI-compatible completions, and a playground page)."""

    checkpoint: str = field(default="gpt_model.pt", metadata={"aliases": ("-c",), "metavar": "PATH"})
    """Our model file or checkpoint, a Hugging Face GPT-2 folder, or a hub id such as openai-community/gpt2 (online)."""
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 opens the server to other machines (set an api_key then)."""
    port: int = 8000
    """Port to listen on (0: any free port, printed at start)."""
    api_key: str | None = None
    """If set, every /v1 request must send 'Authorization: Bearer API_KEY' (default: $EXAMPLEGPT_API_KEY if set)."""
    model_name: str | None = None
    """Model id reported by /v1/models and in responses; none: the checkpoint's file or folder name."""
    max_batch: int = 16
    """Requests decoded together (each choice of a request is one)."""
    max_queue: int = 64
    """Requests waiting for a place in the batch; past it the server answers 503 with Retry-After."""
    max_tokens_limit: int = 4096
    """The largest max_tokens a request may ask for (output past the context slides, as in generate)."""
    drain_seconds: float = 10.0
    """On SIGTERM, in-flight requests may finish for this long; then they are cut short."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""
    precision: str = "auto"
    """The weights' format: auto, fp32, bf16, fp16 or int8 (weight-only, float32 activations). auto is bf16 on a CUDA GPU that has it, else fp32 (exact; on CPU int8 decodes faster but is not bit-exact, and evaluates at about fp32's speed: evaluation multiplies many rows at once)."""
    fast_cpu: bool = True
    """On CPU, multiply by copies of the weights in faster layouts (packed, transposed, mkl_packed) where a trial finds them faster (cpu_inference.py); off: plain PyTorch."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_queue", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.drain_seconds < 0:
            raise UserError(f"drain_seconds must not be negative, got {self.drain_seconds}")
        if self.api_key == "":
            raise UserError("api_key must not be empty")
        check_device(self.device)
        self.precision = precision_name(self.precision, INFERENCE_PRECISIONS)


@dataclass
class ExportConfig:
    """Which model to write as a Hugging Face GPT-2 folder, and where."""

    out_dir: str = field(metadata={"hidden_aliases": ("--out",), "metavar": "DIR"})
    """Folder to write: config.json, model.safetensors and the tokenizer's files."""
    checkpoint: str = field(default="gpt_model.pt", metadata={"aliases": ("-c",), "metavar": "PATH"})
    """Our model file or checkpoint, a Hugging Face GPT-2 folder, or a hub id such as openai-community/gpt2 (online)."""
    force: bool = False
    """Overwrite the folder if it exists."""


@dataclass
class PlotConfig:
    """Which runs to plot, and where."""

    runs: list[str] = field(metadata={"positional": "RUN_DIR"})
    """Run folders (each with a metrics.jsonl), or metrics.jsonl files: one curve each."""
    out: str = field(default="loss.png", metadata={"metavar": "FILE"})
    """Image (PNG) to write: train and validation loss against step, the learning rate faint."""


def build(cls: type, values: dict) -> object:
    """Construct a config dataclass from a dict, rejecting unknown keys and wrong types in one line."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {RENAMED[k] if k in RENAMED and RENAMED[k] in names else k: v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown {cls.__name__} setting: {unknown[0]}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise UserError(f"--{missing[0].replace('_', '-')} is required")
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in values.items():
        check_type(key, value, hints[key])
    return cls(**values)


def check_type(name: str, value: object, hint: str) -> None:
    """Raise UserError if `value` does not fit the annotation `hint` (as written, e.g. 'int | None')."""
    allowed = [part.strip() for part in hint.split("|")]
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "None": lambda v: v is None,
        "list[str]": lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
    }
    if not any(ok[kind](value) for kind in allowed):
        raise UserError(f"{name} must be {type_words(hint)}, got {value!r}")
    if isinstance(value, float) and math.isnan(value):  # every comparison with NaN is false: range checks miss it
        raise UserError(f"{name} must be a number, got nan")


def type_words(hint: str) -> str:
    """An annotation as written ('int | None') in words: 'int or None'."""
    return " or ".join(part.strip() for part in hint.split("|"))


def describe(configs: dict[str, dict]) -> str:
    """Resolved settings ({"model": {...}, "train": {...}}) as a few readable lines: name=value, wrapped."""
    lines = []
    for section, values in configs.items():
        pairs = " ".join(f"{name}={json.dumps(value)}" for name, value in values.items())
        lines += textwrap.wrap(
            pairs,
            width=110,
            initial_indent=f"  {section:<6} ",
            subsequent_indent=" " * 9,
            break_long_words=False,
            break_on_hyphens=False,
        )
    return "\n".join(lines)


def save_config(configs: dict[str, dict], folder: Path) -> Path:
    """The resolved settings as folder/run_config.json (written whole or not at all); returns its path.

    Not config.json: a folder holding that is read as a Hugging Face model folder by `-c` and `--init-from`."""
    path = folder / "run_config.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(configs, indent=2) + "\n")
    os.replace(tmp, path)
    return path
