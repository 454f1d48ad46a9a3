"""Every command the README shows parses: its flags exist, take valid values and pass the cross-option checks.

Commands come from the README's bash code blocks (continuation lines joined, comments dropped) and from its
inline code spans that start like a command. Each is checked by what runs it:
- ``python train.py ARGS`` (also after ``torchrun [its flags]``): ``configs.schema.read_options(ARGS).config()``
  and ``configs.checks.check_run``, which read the --configs YAML and validate types, choices and the
  checks across options (the trainer's own included) without opening a
  checkpoint or a dataset, so placeholder paths (PRE, PRETRAINED.pth.tar, CKPT, RUN/...) are fine;
- ``python export.py ARGS``: export.py's own parser and field checks, and the --out suffix of the format;
- ``python -m study.report ARGS``, ``python -m data.lmdb_writer ARGS``, ``python bench/X.py ARGS``: their argparse
  parser (the module's main() is stopped right after it parsed);
- ``bash X.sh ARGS`` / ``sh/X.sh ARGS`` / ``bash .ci/run``: the script exists and ``bash -n`` passes (a launcher's
  arguments go to train.py at run time);
- ``prune-train``, ``prune-export``, ``prune-report`` (the console scripts): as train.py, export.py, study.report;
- ``pip install .[EXTRAS]`` / ``pip install -e .``: the extras named exist in pyproject.toml; ``pip install -r
  FILE``: the requirements file exists in the project;
- ``python -c CODE``: the code compiles; ``python -m pytest|ruff|mypy ...``: the tool is installed.
Leading ``NAME=VALUE`` settings (``SEEDS="1 2 3" bash sh/study.sh``) belong to the command; ``&&`` splits a
line into commands. Written alternatives are expanded: ``configs/Digits/{hydra,bip}.yml`` and
``--layer-type filter|channel`` give one command per choice. A ``...`` argument ("the same train.py arguments")
is dropped. An inline span naming a tool with no arguments (``python -m data.lmdb_writer``) is a reference: only
its existence is checked. Lines the checker cannot handle fail the test, except the SKIPPED ones below.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# README text (a whole command line or inline span) -> why it is not checked.
SKIPPED = {
    'export SEEDS="1 2 3"': "a shell setting for the commands after it, not a command",
    "torchrun --max-restarts=N": "a torchrun flag named in running text, not a command",
    "torchrun --max-restarts": "a torchrun flag named in running text, not a command",
}
COMMAND_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:python3?|bash|torchrun|pip|prune-|sh/|bench/|\.ci/)")
ENV_SETTING = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
THIRD_PARTY_TOOLS = {"pytest", "ruff", "mypy"}
CONSOLE_SCRIPTS = {"prune-train": "train.py", "prune-export": "export.py", "prune-report": "-m study.report"}
EXTRAS = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"])


@dataclass(frozen=True)
class Command:
    line: int        # README line number
    text: str        # as written (continuations joined)
    inline: bool     # from an inline code span of running text

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def readme_commands(text: str) -> list[Command]:
    commands = []
    fenced = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)
    for block in fenced.finditer(text):
        if block.group(1) not in ("bash", "sh", "shell", "console"):
            continue  # output, Python and untagged blocks hold no shell commands
        first = text.count("\n", 0, block.start(2)) + 1
        lines = block.group(2).split("\n")
        i = 0
        while i < len(lines):
            start, joined = i, lines[i]
            while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            stripped = joined.strip()
            if stripped and not stripped.startswith("#"):
                commands.append(Command(first + start, stripped, inline=False))
    prose = fenced.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keep line numbers
    for span in re.finditer(r"`([^`\n]+)`", prose):
        body = span.group(1).strip()
        if COMMAND_START.match(body) and " " in body:
            commands.append(Command(prose.count("\n", 0, span.start()) + 1, body, inline=True))
    return commands


def _alternatives(word: str) -> list[str]:
    """``a{b,c}d`` -> [abd, acd]; ``x|y`` -> [x, y] (the README's way of writing choices)."""
    brace = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if brace:
        return [alt for choice in brace.group(1).split(",")
                for alt in _alternatives(word[:brace.start()] + choice + word[brace.end():])]
    return word.split("|") if "|" in word and not word.startswith("|") else [word]


def expand(words: list[str]) -> list[list[str]]:
    variants = list(itertools.product(*(_alternatives(w) for w in words)))
    assert len(variants) <= 64, f"{len(variants)} alternatives: too many to check"
    return [list(v) for v in variants]


class _Parsed(Exception):
    """Raised right after a script's argparse parser accepted its command line."""


def _parse_only(main, argv: list[str], monkeypatch: pytest.MonkeyPatch, *, pass_argv: bool) -> str | None:
    """Run ``main`` until its parser has parsed ``argv``: None if it accepted it, else the parser's message."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        patch.setattr(sys, "argv", ["prog", *argv])
        try:
            main(argv) if pass_argv else main()
        except _Parsed:
            return None
        except SystemExit as exc:
            return f"the parser refused it (exit {exc.code})"
    return "main() returned without parsing a command line"


def _script(path: str) -> str | None:
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
        return f"{path} does not exist"
    done = subprocess.run(["bash", "-n", full], capture_output=True, text=True, timeout=60)
    return None if done.returncode == 0 else f"bash -n {path}: {done.stderr.strip()}"


def _pip(args: list[str]) -> str | None:
    """``pip install`` of this project: the folder, editable or not, with extras that pyproject.toml declares."""
    if args[:1] != ["install"]:
        return f"pip {' '.join(args)}: only pip install of this project is shown"
    if args[1:2] == ["-r"] and len(args) == 3:  # a requirements file of the project (bench/requirements-bench.txt)
        return None if os.path.isfile(os.path.join(ROOT, args[2])) else f"pip install -r {args[2]}: no such file"
    targets = [a for a in args[1:] if not a.startswith("-")]
    for target in targets:
        m = re.fullmatch(r"(\.|pruning-trainer)(?:\[([\w,-]+)\])?", target)
        if m is None:
            return f"pip install {target}: not this project"
        unknown = set((m.group(2) or "").split(",")) - EXTRAS - {""}
        if unknown:
            return f"pip install {target}: no extra {sorted(unknown)} in pyproject.toml (it has {sorted(EXTRAS)})"
    return None if targets else "pip install of nothing"


def check_words(words: list[str], *, inline: bool, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """None if the command parses, else what is wrong with it."""
    from configs.errors import UserError
    from configs.schema import read_options

    while words and ENV_SETTING.match(words[0]):
        words = words[1:]
    if not words:
        return "no command after the settings"
    words = [w for w in words if w != "..."]
    program, args = words[0], words[1:]
    if program in CONSOLE_SCRIPTS:
        target = CONSOLE_SCRIPTS[program]
        program, args = "python", [*target.split(), *args]
    if program == "pip" or program in ("python", "python3") and args[:2] == ["-m", "pip"]:
        return _pip(args[2:] if program != "pip" else args)
    if program == "bash" or program.startswith(("sh/", "bench/", ".ci/")) and not program.endswith(".py"):
        script = args[0] if program == "bash" else program
        problem = _script(script)
        if problem is None and program != "bash" and not os.access(os.path.join(ROOT, script), os.X_OK):
            problem = f"{script} is run directly but is not executable"
        return problem
    if program == "torchrun":
        if "train.py" not in args:
            return "torchrun without train.py"
        program, args = "python", args[args.index("train.py"):]
    if program not in ("python", "python3") or not args:
        return f"not a command this test knows ({program}): teach tests/test_readme_commands.py, or list it in SKIPPED"
    if args[0] == "-c":
        compile(args[1], "<README>", "exec")
        return None
    if args[0] == "-m":
        module, args = args[1], args[2:]
        if module in THIRD_PARTY_TOOLS:
            return None if importlib.util.find_spec(module) else f"{module} is not installed"
        if importlib.util.find_spec(module) is None:
            return f"no module {module}"
        if inline and not args:
            return None  # a reference to the tool
        source = open(importlib.util.find_spec(module).origin, encoding="utf-8").read()
        if "parse_args(" not in source:
            return None  # no parser (python -m configs.schema prints the flag table)
        return _parse_only(importlib.import_module(module).main, args, monkeypatch, pass_argv=True)
    script, args = args[0], args[1:]
    if not os.path.isfile(os.path.join(ROOT, script)):
        return f"{script} does not exist"
    if inline and not args:
        return None  # a reference to the script
    try:
        if script == "train.py":
            from configs.checks import check_run
            from trainers import TRAINERS

            cfg = read_options(args).config()
            check_run(cfg, trainer=TRAINERS.get(cfg.trainer), registry=TRAINERS.items())
            return None
        if script == "export.py":
            import export
            from deploy.api import FORMATS

            options = export.read_options(args)
            suffixes = FORMATS.get(options.format).suffixes  # checked by export.py once the model is built
            return None if options.out.endswith(suffixes) else f"--format {options.format} writes {suffixes}"
    except UserError as exc:
        return f"error: {exc}"
    if script.startswith(("bench/", "examples/")) and script.endswith(".py"):
        module = importlib.import_module(script[:-3].replace("/", "."))
        return _parse_only(module.main, args, monkeypatch, pass_argv=False)
    return f"not a command this test knows ({script}): teach tests/test_readme_commands.py, or list it in SKIPPED"


def check(command: Command, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every problem of one README command (one per alternative and per ``&&`` part that fails)."""
    try:
        words = shlex.split(command.text, comments=True)
    except ValueError as exc:
        return [f"not valid shell: {exc}"]
    parts = [list(g) for sep, g in itertools.groupby(words, key=lambda w: w == "&&") if not sep]
    problems = []
    for part in parts:
        for variant in expand(part):
            problem = check_words(variant, inline=command.inline, monkeypatch=monkeypatch)
            if problem:
                problems.append(f"{shlex.join(variant)}: {problem}")
    return problems


COMMANDS = readme_commands(open(README, encoding="utf-8").read())


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.text not in SKIPPED], ids=lambda c: f"L{c.line}")
def test_readme_command_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # as the README runs them: --configs configs/... from the project folder
    problems = check(command, monkeypatch)
    assert not problems, f"{command}\n  " + "\n  ".join(problems)


def test_the_readme_shows_the_commands_this_test_expects():
    texts = [c.text for c in COMMANDS]
    assert set(SKIPPED) <= set(texts), f"SKIPPED lists lines the README no longer has: {set(SKIPPED) - set(texts)}"
    assert sum("train.py" in t for t in texts) >= 25
    assert any(t.startswith("python export.py") for t in texts)
    assert any(t.startswith("python -m study.report") for t in texts)
    assert any("bash sh/study.sh" in t for t in texts)


@pytest.mark.parametrize("text", [
    "python train.py --configs configs/Digits/hydra.yml --no-such-flag 1",
    "python train.py --configs configs/Digits/hydra.yml --layer-type diagonal",
    "python train.py --configs configs/Digits/no_such.yml",
    "python train.py --configs configs/Digits/{hydra,nope}.yml --k 0.5",
    "python export.py CKPT --format slim --out model.txt",
    "python -m study.report RESULTS --no-such-flag",
    "SEEDS=1 bash sh/no_such.sh Digits",
    "pip install '.[plots]'",
    "pip install -r bench/no-such-requirements.txt",
    "prune-train --configs configs/Digits/hydra.yml --no-such-flag 1",
    "python bench/bench_step.py --no-such-flag",
    "curl https://example.com",
])
def test_the_checker_refuses_a_broken_command(text, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert check(Command(0, text, inline=False), monkeypatch)
