"""The command line: `python example.py <command>` and the `examplegpt` console script.

Flags are generated from the config dataclasses (config.py); a `--config FILE` (TOML or YAML) sets the
same fields, and flags win over the file. Every user error ends as one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from .config import (
    PRESETS,
    RENAMED,
    DataConfig,
    EvaluateConfig,
    GenerateConfig,
    GPTConfig,
    ServeConfig,
    TrainConfig,
    build,
    check_type,
    field_docs,
)
from .errors import UserError
from .reproducibility import pin_cpu_arithmetic


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) instead of the usage block,
    and a misspelt flag is an error rather than a guess (no abbreviations)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_optional(kind: type):
    """Parser for an `X | None` field: 'none' (and, for numbers, 'auto') mean None."""

    def parse(text: str):
        if text.lower() == "none" or (kind is int and text.lower() == "auto"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} or 'auto', got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


SCALARS = {"int": int, "float": float, "str": str}


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field, named after it (`--num-layers`), with its docstring as help."""
    docs = field_docs(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        names = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if f.type == "bool":
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        elif f.type == "list[str]":
            group.add_argument(*names, action="append", metavar="TEXT", **common)
        elif f.type.endswith("| None"):
            kind = SCALARS[f.type.split("|")[0].strip()]
            if "bare_flag" in f.metadata:  # the flag alone means this value (`--resume` is `--resume auto`)
                common.update(nargs="?", const=f.metadata["bare_flag"])
            group.add_argument(*names, type=parse_optional(kind), metavar=kind.__name__.upper(), **common)
        else:
            kind = SCALARS[f.type]
            group.add_argument(*names, type=kind, metavar=kind.__name__.upper(), **common)


def read_config_file(path: str) -> dict:
    """Settings from a TOML or YAML file, flat or in [model] / [data] / [train] / [generate] sections."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        if p.suffix == ".toml":
            values = tomllib.loads(p.read_text())
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(p.read_text()) or {}
        else:
            raise UserError(f"config file must end in .toml, .yaml or .yml: {path}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {path}: {e}") from None
    except Exception as e:
        if type(e).__module__.startswith("yaml"):
            raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
        raise
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a table of settings")
    flat = {}
    for key, value in values.items():
        if key in ("model", "data", "train", "generate", "serve") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def resolve(
    args: argparse.Namespace, classes: dict[str, type], base: dict | None = None, check: Callable | None = None
) -> dict[str, object]:
    """Each config of a command from defaults < preset (or `base`, a saved run's config) < config file < flags.
    `check(name, values)` sees each config's values before they are validated (train: the shape a resumed
    checkpoint or an --init-from model fixes)."""
    given = {k: v for k, v in vars(args).items() if k not in ("run", "config", "preset")}
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    from_file = {RENAMED.get(k, k): v for k, v in from_file.items()}  # earlier names of settings still read
    if "preset" in from_file and getattr(args, "preset", None) is None:
        args.preset = from_file["preset"]
    from_file.pop("preset", None)
    known = {f.name for cls in classes.values() for f in dataclasses.fields(cls)}
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise UserError(f"{args.config}: unknown setting '{unknown[0]}'")
    resolved = {}
    for name, cls in classes.items():
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict((base or {}).get(name, {}))
        if cls is GPTConfig and getattr(args, "preset", None):
            if args.preset not in PRESETS:
                raise UserError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
            values.update(PRESETS[args.preset])
        values.update({k: v for k, v in from_file.items() if k in names})
        values.update({k: v for k, v in given.items() if k in names})
        if check:
            check(name, values)
        resolved[name] = build(cls, values)
    return resolved


def run_train(args: argparse.Namespace) -> int:
    from .checkpoint import load_start
    from .distributed import exit_without_teardown, torchrun_world_size
    from .train import train

    # What the run starts from is read first: a resumed run's saved settings (or an --init-from model's
    # shape) are the base that the config file and the flags apply to.
    start = load_start(*(given_setting(args, TrainConfig, name) for name in ("resume", "init_from", "out_dir")))
    configs = resolve(
        args,
        {"model": GPTConfig, "data": DataConfig, "train": TrainConfig},
        base=start.base_config(),
        check=start.check,
    )
    status = train(configs["model"], configs["data"], configs["train"], start)
    if torchrun_world_size() > 1:  # a torchrun worker whose run is over: see exit_without_teardown
        exit_without_teardown(status)
    return status


def given_setting(args: argparse.Namespace, cls: type, name: str) -> object:
    """One setting as the flags, else the config file, else its default give it, before the others are resolved."""
    if name in vars(args):
        return vars(args)[name]
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = read_config_file(args.config).get(name, field.default) if getattr(args, "config", None) else field.default
    check_type(name, value, field.type)
    return value


def run_plot(args: argparse.Namespace) -> int:
    from .metrics import plot_runs

    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not (run / "metrics.jsonl").is_file() and not (run.is_file() and run.suffix == ".jsonl"):
            raise UserError(f"{run} has no metrics.jsonl")
    plot_runs(runs, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_command

    configs = resolve(args, {"evaluate": EvaluateConfig, "data": DataConfig})
    return evaluate_command(configs["evaluate"], configs["data"])


def run_export(args: argparse.Namespace) -> int:
    from .tokenizer import write_hf_tokenizer_files
    from .weights import load_model, save_hf_folder

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"{out} already exists: pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    model = load_model(args.checkpoint)
    save_hf_folder(model, out)
    write_hf_tokenizer_files(out)
    print(f"wrote {out}: config.json, model.safetensors, vocab.json, merges.txt, tokenizer_config.json")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    configs = resolve(args, {"model": GPTConfig, "data": DataConfig})
    prepare(configs["data"], min_tokens=configs["model"].max_seq_len + 1, verbose=True)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from .generate import generate_command

    configs = resolve(args, {"generate": GenerateConfig})
    return generate_command(configs["generate"])


def run_serve(args: argparse.Namespace) -> int:
    from .serve import serve_command

    configs = resolve(args, {"serve": ServeConfig})
    return serve_command(configs["serve"])


def build_parser() -> Parser:
    parser = Parser(prog="examplegpt", description="ExampleGPT: train GPT-2 from scratch, and sample from it.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a model (prepares the data first if needed)")
    train.add_argument("--config", help="TOML or YAML file of settings (flags win over it)")
    train.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default: 124M)")
    for cls in (GPTConfig, DataConfig, TrainConfig):
        add_config_flags(train, cls)
    train.set_defaults(run=run_train)

    prepare = commands.add_parser("prepare", help="download and tokenize a corpus into the token cache")
    prepare.add_argument("--config", help="TOML or YAML file of settings (flags win over it)")
    prepare.add_argument("--preset", help="model preset (its max_seq_len sets the smallest usable split)")
    add_config_flags(prepare, DataConfig)
    prepare.add_argument("--max-seq-len", dest="max_seq_len", type=int, default=argparse.SUPPRESS)
    prepare.set_defaults(run=run_prepare)

    generate = commands.add_parser("generate", help="generate text from a trained model")
    generate.add_argument("--config", help="TOML or YAML file of settings (flags win over it)")
    add_config_flags(generate, GenerateConfig)
    generate.set_defaults(run=run_generate)

    serve = commands.add_parser("serve", help="serve a model over HTTP: OpenAI-compatible API and a playground")
    serve.add_argument("--config", help="TOML or YAML file of settings (flags win over it)")
    add_config_flags(serve, ServeConfig)
    serve.set_defaults(run=run_serve)

    evaluate = commands.add_parser("evaluate", help="perplexity over a whole split, with a sliding window")
    evaluate.add_argument("--config", help="TOML or YAML file of settings (flags win over it)")
    add_config_flags(evaluate, EvaluateConfig)
    add_config_flags(evaluate, DataConfig)
    evaluate.set_defaults(run=run_evaluate)

    export = commands.add_parser("export", help="write a Hugging Face GPT-2 folder (safetensors)")
    export.add_argument("-c", "--checkpoint", default="gpt_model.pt", help="model to export (default: gpt_model.pt)")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--force", action="store_true", help="overwrite the folder if it exists")
    export.set_defaults(run=run_export)

    plot = commands.add_parser("plot", help="plot the loss curves of one or more runs")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with a metrics.jsonl)")
    plot.add_argument("--out", default="loss.png", help="image to write (default: loss.png)")
    plot.set_defaults(run=run_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    pin_cpu_arithmetic()  # before any matrix product: same bits in every process
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `examplegpt generate | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
