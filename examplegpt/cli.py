"""The command line: `python example.py <command>` and the `examplegpt` console script.

Flags are generated from the config dataclasses (config.py); a `--config FILE` (TOML or YAML) sets the
same fields, and flags win over the file. Every user error ends as one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import inspect
import os
import re
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import torch

from .config import (
    PRESETS,
    RENAMED,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    GenerateConfig,
    GPTConfig,
    PlotConfig,
    ServeConfig,
    TrainConfig,
    build,
    check_type,
    field_docs,
    type_words,
)
from .errors import UserError
from .reproducibility import pin_cpu_arithmetic


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) instead of the usage block, a misspelt
    flag is an error rather than a guess (no abbreviations), and the error names the flag it was close to."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, Parser] = {}  # filled by build_parser on the top-level parser

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:  # reported by the command's parser, which knows the flags it was close to
            parser = self.commands.get(getattr(parsed, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(unknown)}{did_you_mean(unknown, visible_flags(parser))}")
        return parsed

    def error(self, message: str) -> None:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:  # a misspelt command
            message += did_you_mean([choice.group(1)], re.findall(r"'([^']*)'", choice.group(2)))
        self.exit(2, f"{self.prog}: error: {message}\n")


def visible_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [name for a in parser._actions if a.help != argparse.SUPPRESS for name in a.option_strings]


def did_you_mean(unknown: list[str], known: list[str]) -> str:
    """' (did you mean --max-steps?)' for the first unknown word that is close to a known one, else ''."""
    for word in unknown:
        close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


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


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    only: tuple[str, ...] | None = None,
    training: bool = True,
    description: str | None = None,
) -> None:
    """One flag per dataclass field, named after it (`--num-layers`), with its docstring as help.

    `only`: just these fields; `training=False`: not the fields marked training_only (evaluate has no
    train split to name); `description`: what the group means to this command (default: the class's docstring)."""
    docs = field_docs(cls)
    first_sentence = " ".join(inspect.getdoc(cls).split()).split(". ")[0].rstrip(".") + "."
    group = parser.add_argument_group(cls.__name__, description or first_sentence)
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or (not training and f.metadata.get("training_only")):
            continue
        names = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        options = dict(dest=f.name, default=argparse.SUPPRESS, help=flag_help(f, docs.get(f.name, "")))
        if "positional" in f.metadata:  # `plot RUN_DIR...`
            group.add_argument(f.name, nargs="+", metavar=f.metadata["positional"], help=options["help"])
            continue
        if f.type == "bool":
            options.update(action=argparse.BooleanOptionalAction)
        elif f.type == "list[str]":
            options.update(action="append", metavar="TEXT")
        elif f.type.endswith("| None"):
            kind = SCALARS[f.type.split("|")[0].strip()]
            if "bare_flag" in f.metadata:  # the flag alone means this value (`--resume` is `--resume auto`)
                options.update(nargs="?", const=f.metadata["bare_flag"])
            options.update(type=parse_optional(kind), metavar=f.metadata.get("metavar", kind.__name__.upper()))
        else:
            kind = SCALARS[f.type]
            options.update(type=kind, metavar=f.metadata.get("metavar", kind.__name__.upper()))
        group.add_argument(*names, **options)
        if "hidden_aliases" in f.metadata:  # earlier names of the flag: still work, not shown
            group.add_argument(*f.metadata["hidden_aliases"], **{**options, "help": argparse.SUPPRESS})


def flag_help(f: dataclasses.Field, doc: str) -> str:
    """The field's docstring, then its default, unless the docstring says it already or there is none to
    show (None: the docstring says what none means; a required field)."""
    doc = doc.replace("%", "%%")  # argparse formats help with %
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return f"{doc} (required)"
    if "(default" in doc or default is None or default == [] or default == "":
        return doc
    if isinstance(default, bool):
        default = "on" if default else "off"
    return f"{doc} (default: {default})"


# The sections a config file may hold, and the settings of each; one file can serve every command.
SECTIONS: dict[str, type] = {
    "model": GPTConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "generate": GenerateConfig,
    "evaluate": EvaluateConfig,
    "serve": ServeConfig,
}


def read_config_file(path: str, classes: dict[str, type]) -> dict:
    """The settings a command of these config `classes` takes from a TOML or YAML file: those of its
    settings that sit flat at the top or in one of its own sections ([model], [data], [train] for train).
    Other commands' settings and sections are skipped, so that one file can serve every command; a
    setting or a section that no command has is an error, and so is a table under a setting's name."""
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
    table = "table" if p.suffix == ".toml" else "mapping"  # what the file's own format calls one
    # every setting's type, by name; where two commands' differ, this command's (seed: generate's may be none)
    every = {f.name: f.type for cls in (*SECTIONS.values(), *classes.values()) for f in dataclasses.fields(cls)}
    every |= {old: every[new] for old, new in RENAMED.items()} | {"preset": "str"}
    mine = {f.name for cls in classes.values() for f in dataclasses.fields(cls)} | set(RENAMED) | {"preset"}
    taken = {}
    for key, value in values.items():
        # YAML reads an empty section (`train:`) as None; `data` is also a setting (a name): a table, a list
        # (TOML's [[data]]) or nothing is its section
        section = key in SECTIONS and (isinstance(value, dict | list) or value is None or key not in every)
        if section and not isinstance(value, dict | None):
            raise UserError(f"{path}: the section [{key}] must be a {table} of settings, got {value!r}")
        if isinstance(value, dict) and not section and key not in every:
            raise UserError(f"{path}: unknown section [{key}]; the sections are {', '.join(SECTIONS)}")
        for name, setting in (value or {}).items() if section else [(key, value)]:
            if section and name in SECTIONS and isinstance(setting, dict):
                raise UserError(f"{path}: the section [{name}] is inside [{key}]: sections sit at the top of the file")
            if name not in every:
                raise UserError(f"{path}: unknown setting '{name}'")
            if isinstance(setting, dict):
                raise UserError(
                    f"{path}: {name} is a setting, not a section: it takes {type_words(every[name])}, not a {table}"
                )
            if name in mine and (not section or key in classes):
                taken[name] = setting
    return taken


def resolve(
    args: argparse.Namespace, classes: dict[str, type], base: dict | None = None, check: Callable | None = None
) -> dict[str, object]:
    """Each config of a command from defaults < preset (or `base`, a saved run's config) < config file < flags.
    `check(name, values)` sees each config's values before they are validated (train: the shape a resumed
    checkpoint or an --init-from model fixes)."""
    given = {k: v for k, v in vars(args).items() if k not in ("run", "command", "config", "preset")}
    from_file = read_config_file(args.config, classes) if getattr(args, "config", None) else {}
    from_file = {RENAMED.get(k, k): v for k, v in from_file.items()}  # earlier names of settings still read
    if "preset" in from_file and getattr(args, "preset", None) is None:
        args.preset = from_file["preset"]
    from_file.pop("preset", None)
    resolved = {}
    for name, cls in classes.items():
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict((base or {}).get(name, {}))
        if cls is GPTConfig and getattr(args, "preset", None):
            if not isinstance(args.preset, str) or args.preset not in PRESETS:
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
    from_file = read_config_file(args.config, {"train": TrainConfig}) if getattr(args, "config", None) else {}
    value = from_file.get(name, field.default)
    check_type(name, value, field.type)
    return value


def run_plot(args: argparse.Namespace) -> int:
    from .metrics import plot_runs

    cfg = resolve(args, {"plot": PlotConfig})["plot"]
    runs = [Path(r) for r in cfg.runs]
    for run in runs:
        if not run.exists():
            raise UserError(f"no such folder: {run}")
        if not (run / "metrics.jsonl").is_file() and not (run.is_file() and run.suffix == ".jsonl"):
            raise UserError(f"{run} has no metrics.jsonl")
    if not Path(cfg.out).resolve().parent.is_dir():
        raise UserError(f"no such folder for --out: {Path(cfg.out).parent}")
    plot_runs(runs, Path(cfg.out))
    print(f"wrote {cfg.out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_command

    configs = resolve(args, {"evaluate": EvaluateConfig, "data": DataConfig})
    return evaluate_command(configs["evaluate"], configs["data"])


def run_export(args: argparse.Namespace) -> int:
    from .tokenizer import write_hf_tokenizer_files
    from .weights import load_model, save_hf_folder

    cfg = resolve(args, {"export": ExportConfig})["export"]
    out = Path(cfg.out_dir)
    try:
        exists = out.exists()
    except OSError as e:  # a name too long, say: exists() reports only a missing path as False
        raise UserError(f"cannot write to the output folder {out}: {e.strerror or e}") from None
    if exists and not cfg.force:
        raise UserError(f"{out} already exists: pass --force to overwrite it")
    if exists and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    model = load_model(cfg.checkpoint)
    save_hf_folder(model, out)
    try:
        write_hf_tokenizer_files(out)
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out}: {e.strerror or e}") from None
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


CONFIG_FILE_HELP = "TOML or YAML file of settings (flags win over it)."


def build_parser() -> Parser:
    parser = Parser(prog="examplegpt", description="ExampleGPT: train GPT-2 from scratch, and sample from it.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, run) -> Parser:
        sub = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        sub.set_defaults(run=run, command=name)
        parser.commands[name] = sub
        return sub

    train = command("train", "train a model (prepares the data first if needed)", run_train)
    train.add_argument("--config", metavar="FILE", help=CONFIG_FILE_HELP)
    train.add_argument("--preset", metavar="NAME", help=f"Model size: {', '.join(PRESETS)} (default: 124M).")
    for cls in (GPTConfig, DataConfig, TrainConfig):
        add_config_flags(train, cls)

    prepare = command("prepare", "download and tokenize a corpus into the token cache", run_prepare)
    prepare.add_argument("--config", metavar="FILE", help=CONFIG_FILE_HELP)
    prepare.add_argument(
        "--preset", metavar="NAME", help="Model preset: its max_seq_len sets the smallest usable split."
    )
    add_config_flags(prepare, DataConfig)
    add_config_flags(
        prepare, GPTConfig, only=("max_seq_len",), description="The model's context: every split must hold more tokens."
    )

    generate = command("generate", "generate text from a trained model", run_generate)
    generate.add_argument("--config", metavar="FILE", help=CONFIG_FILE_HELP)
    add_config_flags(generate, GenerateConfig)

    serve = command("serve", "serve a model over HTTP: OpenAI-compatible API and a playground", run_serve)
    serve.add_argument("--config", metavar="FILE", help=CONFIG_FILE_HELP)
    add_config_flags(serve, ServeConfig)

    evaluate = command("evaluate", "perplexity over a whole split, with a sliding window", run_evaluate)
    evaluate.add_argument("--config", metavar="FILE", help=CONFIG_FILE_HELP)
    add_config_flags(evaluate, EvaluateConfig)
    add_config_flags(
        evaluate, DataConfig, training=False, description="The text to score and where its tokens are cached."
    )

    export = command("export", "write a Hugging Face GPT-2 folder (safetensors)", run_export)
    add_config_flags(export, ExportConfig)

    plot = command("plot", "plot the loss curves of one or more runs", run_plot)
    add_config_flags(plot, PlotConfig)
    return parser


def is_out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, a GPU's torch.OutOfMemoryError, or torch's CPU allocator (a plain RuntimeError,
    also where the size asked for overflows 64 bits)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return "can't allocate memory" in str(error) or "Storage size calculation overflowed" in str(error)


def tried_to_allocate(error: BaseException) -> str:
    """' (tried to allocate 8.0 GB)' where torch says how much, else ''."""
    found = re.search(r"tried to allocate (\d+) bytes", str(error), re.IGNORECASE)
    if found:
        return f" (tried to allocate {int(found[1]) / 1e9:,.1f} GB)"
    found = re.search(r"tried to allocate ([\d.]+ [KMGT]iB)", str(error), re.IGNORECASE)
    return f" (tried to allocate {found[1]})" if found else ""


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
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        print(f"error: out of memory{tried_to_allocate(e)}: ask for less (fewer new tokens or samples, a smaller "
              "batch, context or model)", file=sys.stderr)  # fmt: skip
        return 1
    except BrokenPipeError:  # `examplegpt generate | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on the device to write {e.filename or 'the output'}", file=sys.stderr)
        # what stdout still holds cannot go out either: drop it, or the interpreter's exit reports it again
        with contextlib.suppress(OSError, ValueError):  # a stdout with no file descriptor holds nothing to drop
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
