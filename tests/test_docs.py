"""The documentation, checked like code: its runnable commands run, its links resolve, its flags exist,
and requirements.txt says what pyproject.toml says.

Marking a fenced block runnable: put `<!-- doctest -->` on the line before its fence (blank lines may sit
between). The blocks of one file run in order, in one fresh copy of the repository (tracked and untracked,
not ignored files: what a clone holds), each in `bash -euo pipefail` (or `python` for a python block), and
each must exit 0; later blocks may use what earlier ones wrote. `<!-- doctest: slow -->` marks a block that
takes minutes: skipped unless EXAMPLEGPT_DOCTEST_SLOW=1, so no quick block may depend on one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import OFFLINE, REPO

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_SLOW = os.environ.get("EXAMPLEGPT_DOCTEST_SLOW") == "1"
MARKER = re.compile(r"^<!--\s*doctest(?::\s*(?P<kind>slow))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
HISTORY = "benchmark-history.md"  # earlier figures: no examples to run, commands as they were run then


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    runnable: bool
    slow: bool

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, with the doctest marker (if any) that precedes it."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    marker: re.Match | None = None
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            if MARKER.match(lines[i].strip()):
                marker = MARKER.match(lines[i].strip())
            elif lines[i].strip():
                marker = None  # a marker applies only to the fence right after it
            i += 1
            continue
        fence, start = opening["fence"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        slow = marker is not None and marker["kind"] == "slow"
        blocks.append(Block(path, start + 1, opening["lang"].lower(), "\n".join(body) + "\n", marker is not None, slow))
        marker = None
    return blocks


def repository_copy(destination: Path) -> Path:
    """The files a fresh clone would have (plus untracked, not ignored ones), copied to `destination`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True
    )
    if listed.returncode != 0:  # not a git checkout (an unpacked archive): copy what is there
        shutil.copytree(
            REPO, destination, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "__pycache__")
        )
        return destination
    for name in listed.stdout.decode().split("\0"):
        source = REPO / name
        if name and source.is_file():  # a file deleted but not yet committed is still listed
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def run_block(block: Block, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd), WANDB_MODE="offline", WANDB_SILENT="true", MPLBACKEND="Agg", **OFFLINE)
    if block.lang == "python":
        command = [sys.executable, "-c", block.code]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    # Generous: a shared 2-core machine can run a one-minute block ten times slower. A session of its own,
    # so that a block that overruns is ended with everything it started (a server, a training run).
    timeout = 7200 if block.slow else 1800
    pipes = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True, **pipes) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n(ran past {timeout} s and was killed)"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the block left running in the background
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def documents_with_runnable_blocks() -> list[Path]:
    return [path for path in DOC_FILES if any(block.runnable for block in code_blocks(path))]


def test_marked_blocks_are_shell_or_python():
    for path in DOC_FILES:
        for block in code_blocks(path):
            if block.runnable:
                assert block.lang in SHELL_LANGS | {"python"}, f"{block}: a doctest marker on a ```{block.lang} block"


def test_the_readme_and_every_guide_have_runnable_examples():
    runnable = {path.name for path in documents_with_runnable_blocks()}
    guides = {path.name for path in DOC_FILES} - {HISTORY}
    assert guides <= runnable, f"no <!-- doctest --> block in: {sorted(guides - runnable)}"


@pytest.mark.slow
@pytest.mark.parametrize("path", documents_with_runnable_blocks(), ids=lambda p: str(p.relative_to(REPO)))
def test_runnable_blocks_exit_zero(path, tmp_path):
    clone = repository_copy(tmp_path / "clone")
    ran = 0
    for block in code_blocks(path):
        if not block.runnable or (block.slow and not RUN_SLOW):
            continue
        proc = run_block(block, clone)
        assert proc.returncode == 0, (
            f"{block} exited {proc.returncode}\n{block.code}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        ran += 1
    if ran == 0:
        pytest.skip("only slow blocks here (EXAMPLEGPT_DOCTEST_SLOW=1 runs them)")


def test_the_doctest_runner_reads_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- doctest -->\n\n```bash\necho one\n```\n\n"
        "<!-- doctest: slow -->\n```bash\nsleep 600\n```\n\n"
        "<!-- doctest -->\nA paragraph breaks the marker.\n```bash\nexit 1\n```\n"
        "````markdown\n```bash\nnested\n```\n````\n"
    )
    blocks = code_blocks(page)
    assert [(b.line, b.runnable, b.slow) for b in blocks] == [
        (3, True, False),
        (8, True, True),
        (14, False, False),
        (17, False, False),
    ]
    assert run_block(blocks[0], tmp_path).stdout == "one\n"
    assert run_block(Block(page, 1, "bash", "false\necho after\n", True, False), tmp_path).returncode != 0


# --- links -------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"(?P<target>[^\"]+)\"", re.IGNORECASE)
HEADING = re.compile(r"^(#{1,6})\s+(?P<title>.+?)\s*#*\s*$")


def markdown_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    names = listed.stdout.split() if listed.returncode == 0 else [str(p.relative_to(REPO)) for p in REPO.rglob("*.md")]
    return [REPO / name for name in names if (REPO / name).is_file() and not name.startswith((".venv/", "build/"))]


def prose_lines(path: Path, keep_inline_code: bool = False) -> list[tuple[int, str]]:
    """The lines outside fenced code, inline code spans removed unless kept: a link inside code is not a link,
    but a heading's `code` is part of its anchor."""
    kept, fence = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening["fence"]
        elif fence is not None and line.startswith(fence):
            fence = None
        elif fence is None:
            kept.append((number, line if keep_inline_code else re.sub(r"(`+).*?\1", "", line)))
    return kept


def github_slug(title: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation but - and _ removed, spaces -."""
    title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link keeps its text
    title = re.sub(r"<[^>]+>", "", title).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path, keep_inline_code=True):
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading["title"])
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    found |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text(encoding="utf-8")))
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for number, line in prose_lines(path):
        for match in [*LINK.finditer(line), *HTML_LINK.finditer(line)]:
            target = match["target"]
            # http:, https:, mailto: are not checked offline
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(REPO)}:{number}: {target}"
            if not linked.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{where} (no heading #{anchor})")
    return broken


def test_relative_links_and_anchors_resolve():
    files = markdown_files()
    assert REPO / "README.md" in files
    broken = [problem for path in files for problem in broken_links(path)]
    assert not broken, "\n".join(broken)


def test_the_link_checker_finds_what_is_broken(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "img.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# A `code` title: here\n\n## Twice\n\n## Twice\n\n"
        "[ok](#a-code-title-here) [ok](#twice-1) ![ok](img.png) [ok](page.md#twice) [web](https://x.invalid/y)\n"
        "[bad](#nowhere) ![bad](missing.png) [bad](page.md#nope) `[code](not-a-link.md)`\n"
        "```\n[in a fence](also-not-a-link.md)\n```\n"
    )
    assert [problem.split(": ", 1)[1] for problem in broken_links(page)] == [
        "#nowhere (no heading #nowhere)",
        "missing.png (no such file)",
        "page.md#nope (no heading #nope)",
    ]


# --- what the guides say the commands say -----------------------------------------------------------


def test_the_guides_quote_the_error_generate_gives_an_empty_prompt(monkeypatch):
    """generate refuses an empty prompt (the server's API takes one): the guides quote the error it prints."""
    import io

    from examplegpt.errors import UserError
    from examplegpt.generate import read_prompt

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))  # piped, and empty
    with pytest.raises(UserError) as refused:
        read_prompt("")
    for guide in (REPO / "README.md", REPO / "docs" / "generate.md"):
        assert f"`error: {refused.value}`" in " ".join(guide.read_text().split()), guide.name


# --- requirements.txt --------------------------------------------------------------------------------


def normalized(requirement: str) -> str:
    name, rest = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(.*)$", requirement).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest.replace(" ", "")


def test_requirements_txt_equals_pyproject_dependencies():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = (REPO / "requirements.txt").read_text().splitlines()
    listed = [line.split("#", 1)[0].strip() for line in lines]
    assert sorted(normalized(r) for r in listed if r) == sorted(normalized(r) for r in declared)


# --- commands in the documentation: every flag they use exists ------------------------------------------

SEPARATORS = {"&&", "||", "|", ";", "&", "(", ")"}
EXPECTED_TO_FAIL = {"!", "refused"}  # a command after these words is meant to be refused


def command_lines(code: str) -> list[list[str]]:
    """Each simple command of a shell block as its words (continuations joined, comments dropped)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError:  # an unbalanced quote: not a command this check can read
            continue
        current: list[str] = []
        for word in [*words, ";"]:
            if word in SEPARATORS:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def program_and_flags(words: list[str]) -> tuple[str, list[str]] | None:
    """('generate', flags) for `python example.py generate ...` (torchrun, -m examplegpt, examplegpt too),
    ('benchmarks/x.py', flags) for `python benchmarks/x.py ...`; None for any other command."""
    for i, word in enumerate(words):
        if (
            word.endswith("example.py")
            or (word == "examplegpt" and i > 0 and words[i - 1] == "-m")
            or (i == 0 and word == "examplegpt")
        ):
            rest = words[i + 1 :]
            if not rest or rest[0].startswith("-"):
                return None  # `example.py --help`
            return rest[0], [w for w in rest[1:] if re.match(r"^--?[A-Za-z]", w)]
        if re.match(r"^benchmarks/\w+\.py$", word):
            return word, [w for w in words[i + 1 :] if re.match(r"^--?[A-Za-z]", w)]
    return None


def cli_options() -> dict[str, set[str]]:
    from examplegpt.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: set(sub._option_string_actions) for name, sub in subcommands.items()}


def documented_commands(paths: list[Path]) -> list[tuple[str, str, list[str]]]:
    found = []
    for path in paths:
        for block in code_blocks(path):
            if block.lang in SHELL_LANGS | {""}:
                for words in command_lines(block.code):
                    if words[0] in EXPECTED_TO_FAIL:
                        continue  # bad input on purpose (docs/robustness.md)
                    parsed = program_and_flags(words)
                    if parsed:
                        found.append((str(block), *parsed))
    return found


def test_every_flag_in_the_readme_and_guides_exists():
    options = cli_options()
    unknown = []
    current = [path for path in DOC_FILES if path.name != HISTORY]  # the history keeps commands as they were run
    for where, program, flags in documented_commands([*current, REPO / "BENCHMARKS.md"]):
        if program.startswith("benchmarks/"):
            continue  # checked against the scripts' --help below
        if program not in options:
            unknown.append(f"{where}: no command {program!r}")
            continue
        unknown += [f"{where}: {program} has no {flag}" for flag in flags if flag.split("=")[0] not in options[program]]
    assert not unknown, "\n".join(unknown)


def test_the_flag_check_reads_shell_lines():
    code = (
        "pip install -e . && python example.py train --data x --max-steps=2 \\\n    --out-dir r  # a comment --nope\n"
    )
    code += "torchrun --nproc_per_node=8 -m examplegpt generate -c m.pt -p 'ROMEO:'\n"
    commands = [program_and_flags(words) for words in command_lines(code)]
    assert commands == [None, ("train", ["--data", "--max-steps=2", "--out-dir"]), ("generate", ["-c", "-p"])]


# Runs each script's --help in one interpreter: torch and transformers are imported once, not per script.
HELP_OF_EACH_SCRIPT = """
import contextlib, io, json, os, runpy, sys
helps = {}
for script in sys.argv[1:]:
    sys.argv, out = [script, "--help"], io.StringIO()
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` would
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        code = "returned without exiting"
    except SystemExit as exit:
        code = exit.code
    helps[script] = {"exit": code, "help": out.getvalue()}
print(json.dumps(helps))
"""


@pytest.mark.slow
def test_benchmark_commands_stay_runnable():
    """Each script BENCHMARKS.md lists answers --help, and names every flag the page uses with it."""
    used: dict[str, set[str]] = {}
    for _, program, flags in documented_commands([REPO / "BENCHMARKS.md"]):
        if program.startswith("benchmarks/"):
            used.setdefault(program, set()).update(flag.split("=")[0] for flag in flags)
    assert used, "BENCHMARKS.md lists no `python benchmarks/...` command"
    env = dict(os.environ, PYTHONPATH=str(REPO), **OFFLINE)
    proc = subprocess.run(
        [sys.executable, "-c", HELP_OF_EACH_SCRIPT, *sorted(used)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    helps = json.loads(proc.stdout.splitlines()[-1])
    for script, flags in sorted(used.items()):
        assert helps[script]["exit"] in (0, None), f"{script} --help: exit {helps[script]['exit']}"
        text = helps[script]["help"]
        missing = [flag for flag in sorted(flags) if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
        assert not missing, f"{script} has no {missing}"


def test_the_readmes_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for part in ('pip install -e ".[dev]"', "python -m pytest"):
        assert part in readme, part
        assert part in ci.replace("pip install -q -e", "pip install -e"), part
