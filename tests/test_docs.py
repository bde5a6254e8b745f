"""Docs that cannot rot: every `crossvlm ...` command in the shell blocks of README.md and docs/*.md
parses through the real parser (subcommand, flags, choices, stage names, `--section.key` overrides and
MiniMind-V flags) without running anything, and every repository path the docs name exists.

Placeholders (DIR, cat.jpg) are fine: arguments are parsed, files are not opened. `...` elides the
rest of a command, `[...]` marks an optional part, and `a|b` (choices) is read as its first choice.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console", "zsh"}


@dataclass
class Command:
    file: Path
    line: int
    text: str
    argv: list[str]  # the arguments after `crossvlm`
    elided: bool     # `...` stood for more arguments

    def __str__(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}: {self.text}"


def _complete(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:  # a quote still open: the command goes on on the next line
        return False
    return True


def _shell_lines(path: Path):
    """(line number, logical line) of every command in the file's shell blocks: continuations and
    multi-line quotes joined, here-documents and console output (lines without `$ `) skipped."""
    lang, pending, start, heredoc = None, "", 0, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"\s*```(\S*)", line)
        if fence and heredoc is None:
            lang = fence[1] if lang is None else None
            continue
        if lang not in SHELL_BLOCKS:
            continue
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if lang == "console" and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        if not _complete(pending):
            pending += "\n"
            continue
        marker = re.search(r"<<-?\s*['\"]?(\w+)", pending)
        heredoc = marker[1] if marker else None
        yield start, pending
        pending = ""


def _crossvlm_argv(words: list[str]) -> list[str] | None:
    """The arguments given to crossvlm in one simple command, or None if it runs something else."""
    while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value before the program
        words = words[1:]
    if words[:1] == ["crossvlm"]:
        return words[1:]
    if words and Path(words[0]).name in ("python", "python3", "torchrun"):
        for i in range(len(words) - 1):
            if words[i:i + 2] == ["-m", "crossvlm.cli"]:
                return words[i + 2:]
    return None


def doc_commands() -> list[Command]:
    commands = []
    for path in DOCS:
        variables: dict[str, str] = {}
        for number, line in _shell_lines(path):
            assignment = re.fullmatch(r"\s*(\w+)=(\"[^\"]*\"|'[^']*'|\S*)\s*", line)
            if assignment:  # B="crossvlm bench train ..." then `$B --stage sft`
                variables[assignment[1]] = assignment[2].strip("'\"")
                continue
            expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), line)
            expanded = re.sub(r"\[(--?\w[^\]]*)\]", r"\1", expanded)  # [--levers cudagraphs]: optional
            lexer = shlex.shlex(expanded, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words, simple = list(lexer), []
            for word in [*words, ";"]:
                if word and set(word) <= set("|&;()<>"):  # the end of one simple command
                    argv = _crossvlm_argv(simple)
                    if argv is not None:
                        elided = "..." in argv
                        argv = [w for w in argv if w != "..."]
                        commands.append(Command(path, number, line.strip(), argv, elided))
                    simple = []
                else:
                    simple.append(word)
    return commands


def check(argv: list[str], elided: bool = False) -> str | None:
    """What is wrong with `crossvlm ARGV` as a command line (None: nothing). Runs no command."""
    from crossvlm.cli import build_parser
    from crossvlm.errors import ConfigError

    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args, extra = parser.parse_known_args(argv)
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1]
        if elided and "the following arguments are required" in message:
            return None  # the elided part holds them
        return message
    if extra and not getattr(args, "accepts_overrides", False):
        return f"unrecognized arguments: {' '.join(extra)}"
    try:
        if args.command == "train" and not args.list:
            from crossvlm.configs import resolve_config
            from crossvlm.train.config import parse_overrides

            if args.config is None and not elided:
                return "no stage named"
            if args.config is not None:
                resolve_config(args.config)
            parse_overrides(extra)
        elif args.command == "init":
            from crossvlm.commands.init import model_options

            model_options(extra)
        elif extra:
            return f"{args.command} takes no overrides, got {' '.join(extra)}"
    except ConfigError as error:
        return str(error)
    return None


COMMANDS = doc_commands()


def test_the_docs_have_commands_to_check():
    files = {c.file.name for c in COMMANDS}
    assert {"README.md", "SERVING.md", "TRAINING.md", "PERFORMANCE.md"} <= files
    subcommands = {c.argv[0] for c in COMMANDS if c.argv}
    assert {"demo", "train", "chat", "serve", "eval", "bench", "make-model", "init", "data"} <= subcommands


def test_every_documented_command_parses():
    problems = [f"{c}\n    -> {problem}" for c in COMMANDS if (problem := check(c.argv, c.elided))]
    assert not problems, "commands in the docs that do not parse:\n" + "\n".join(problems)


@pytest.mark.parametrize("argv,wrong", [
    (["train", "configs/pretrain.yaml"], "configs/pretrain.yaml does not exist"),
    (["train", "sft", "--run.max_step", "3"], "run has no key 'max_step'"),
    (["train", "sft", "--save_weights", "x"], "unknown option --save_weights"),
    (["chat", "--modle", "DIR"], "unrecognized arguments: --modle"),
    (["eval", "--model", "DIR", "--data", "x", "--task", "poem"], "invalid choice: 'poem'"),
    (["demo", "--projector", "linear"], "invalid choice: 'linear'"),
    (["eval", "--data", "x"], "the following arguments are required: --model"),
    (["bench", "nope"], "invalid choice: 'nope'"),
    (["init", "--out", "DIR", "--run.epochs", "2"], "only --model.* options"),
])
def test_the_check_catches_broken_commands(argv, wrong):
    assert wrong in (check(argv) or "")


def test_the_extraction_reads_shell_the_way_docs_write_it(tmp_path, monkeypatch):
    page = tmp_path / "PAGE.md"
    page.write_text(
        "```bash\n"
        "pip install -e . && crossvlm demo   # a comment\n"
        "B=\"crossvlm bench train --steps 8\"\n"
        "$B --stage sft \\\n  --variants ours\n"
        "torchrun --nproc_per_node 2 -m crossvlm.cli train sft ...\n"
        "CUDA_VISIBLE_DEVICES=0 crossvlm bench train ... --batch-size 32|64 [--levers cudagraphs]\n"
        "```\n"
        "```console\n$ crossvlm eval --model DIR --data x\nerror output: crossvlm chat --bogus\n```\n"
        "```python\nimport crossvlm  # crossvlm train nope\n```\n")
    monkeypatch.setattr(f"{__name__}.DOCS", [page])
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    found = [(c.line, c.argv, c.elided) for c in doc_commands()]
    assert found == [
        (2, ["demo"], False),
        (4, ["bench", "train", "--steps", "8", "--stage", "sft", "--variants", "ours"], False),
        (6, ["train", "sft"], True),
        (7, ["bench", "train", "--batch-size", "32"], True),
        (10, ["eval", "--model", "DIR", "--data", "x"], False),
    ]


# -- paths ------------------------------------------------------------------------------------------------
TOP = {p.split("/")[0] for p in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                                check=True).stdout.split() if "/" in p} | {"configs"}


def test_every_repository_path_the_docs_name_exists():
    """Markdown link targets, and `code` spans that start with a folder of the repository (or the old
    `configs/`): each exists beside the page or at the repository's root."""
    missing = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            named = [m for m in re.findall(r"\]\(([^)#\s]+)\)", line) if not re.match(r"\w+:", m)]
            named += [m for m in re.findall(r"`([\w.-]+/[\w./*-]*)(?:::\w+)?`", line) if m.split("/")[0] in TOP]
            for target in named:
                if not any(list(base.glob(target)) or (base / target).exists() for base in (path.parent, ROOT)):
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    assert not missing, "paths the docs name that do not exist:\n" + "\n".join(missing)
