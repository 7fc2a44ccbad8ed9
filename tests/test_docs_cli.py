"""Every `resdeploy` subcommand and flag that README.md and docs/*.md name exists, read with the CLI's own parser.

What is checked:
- in fenced code blocks, every command line (backslash continuations joined, ``#`` comments dropped) that runs
  ``resdeploy`` (also ``.venv/bin/resdeploy``, ``python -m resdeploy``): its subcommands, nested ones included
  (``experiment degradation``), and every ``--flag`` after them against that subcommand's options;
- in inline code (single backticks): a span that starts with such a command, the same way; and a span that starts
  with a flag (``--workers auto``) must be a flag of some resdeploy subcommand, unless it is another tool's flag
  listed in OTHER_TOOLS_FLAGS with the tool it belongs to.

Synopses with ``[--flag X]`` and ``A | B`` are read as flags; ``--flag=value`` as ``--flag``.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from resdeploy.pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Flags of other tools that the docs name in inline code on their own: flag -> the tool it belongs to.
OTHER_TOOLS_FLAGS = {
    "--vs-triton": "benchmarks/serve_bench.py", "--overhead-only": "benchmarks/serve_bench.py",
    "--server-cpus": "benchmarks/serve_bench.py", "--server-arg": "benchmarks/serve_bench.py",
    "--ab-against": "benchmarks/serve_bench.py", "--reference-arg": "benchmarks/serve_bench.py",
    "--resnet50": "benchmarks/serve_bench.py", "--build-arg": "docker build",
    **{f: "polygraphy run" for f in ("--trt", "--onnxrt", "--data-loader-script", "--save-inputs", "--load-inputs",
                                     "--load-outputs", "--check-error-stat", "--atol", "--rtol", "--postprocess",
                                     "--compare", "--strongly-typed")},
}

# `resdeploy ...`, `.venv/bin/resdeploy ...`, `python -m resdeploy ...`; not `resdeploy.artifact` or `resdeploy/serve`
COMMAND = re.compile(r"(?:^|[\s;&|(])(?:\S*/)?(?:resdeploy|python3? -m resdeploy)(?=\s|$)(?P<rest>.*)$")
COMMAND_SPAN = re.compile(r"^(?:\S*/)?(?:resdeploy|python3? -m resdeploy)(?=\s|$)(?P<rest>.*)$")
FENCE = re.compile(r"^```.*?$(?P<body>.*?)^```\s*$", re.S | re.M)
INLINE = re.compile(r"(?<!`)`(?P<code>[^`\n]+)`(?!`)")
WORD = re.compile(r"^[a-z][a-z0-9-]*$")


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def all_flags(parser: argparse.ArgumentParser) -> set[str]:
    found = options(parser)
    for sub in subparsers(parser).values():
        found |= all_flags(sub)
    return found


def tokens(rest: str) -> list[str]:
    """The words of a command line after ``resdeploy``: synopsis brackets and alternatives split off."""
    rest = rest.split(" #", 1)[0]
    rest = re.sub(r"[\[\]|(){}]", " ", rest)
    try:
        return shlex.split(rest, comments=False)
    except ValueError:  # an unbalanced quote in prose: plain split
        return rest.split()


def check_command(rest: str, parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Problems with one ``resdeploy ...`` mention: an unknown subcommand, or a flag its subcommand lacks."""
    words = tokens(rest)
    current, path = parser, ["resdeploy"]
    i = 0
    while i < len(words) and subparsers(current):
        word = words[i]
        if word.startswith("-"):
            break
        if word not in subparsers(current):
            if WORD.match(word):
                return [f"{where}: `{' '.join(path)} {word}`: no such subcommand "
                        f"(known: {', '.join(sorted(subparsers(current)))})"]
            return []  # a placeholder such as COMMAND or <sub>
        current, path, i = subparsers(current)[word], [*path, word], i + 1
    known = options(current)
    problems = []
    for word in words[i:]:
        if word.startswith("--") and len(word) > 2:
            flag = word.split("=", 1)[0].rstrip(",.;:")
            if flag not in known:
                problems.append(f"{where}: `{' '.join(path)}` has no flag {flag}")
    return problems


def logical_lines(block: str) -> list[str]:
    return block.replace("\\\n", " ").splitlines()


def check_text(text: str, parser: argparse.ArgumentParser, name: str = "text") -> list[str]:
    """Every problem in one document's resdeploy mentions (empty when all exist)."""
    problems: list[str] = []
    for fence in FENCE.finditer(text):
        line_no = text.count("\n", 0, fence.start()) + 1
        for line in logical_lines(fence["body"]):
            if line.lstrip().startswith("#"):
                continue  # a comment line
            m = COMMAND.search(line.split(" #", 1)[0])
            if m:
                problems += check_command(m["rest"], parser, f"{name}:{line_no} (code block)")
    every_flag = all_flags(parser)
    for span in INLINE.finditer(FENCE.sub("", text)):
        code = span["code"].strip()
        m = COMMAND_SPAN.match(code)
        if m:
            problems += check_command(m["rest"], parser, f"{name} (inline `{code}`)")
        elif code.startswith("--") and len(code) > 2:
            flag = re.split(r"[\s=\[]", code, maxsplit=1)[0].rstrip(",.;:")
            if flag not in every_flag and flag not in OTHER_TOOLS_FLAGS:
                problems.append(f"{name} (inline `{code}`): {flag} is no flag of any resdeploy subcommand "
                                "(another tool's? add it to OTHER_TOOLS_FLAGS with the tool)")
    return problems


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_subcommand_and_flag_named_in_the_docs_exists(doc: Path, parser: argparse.ArgumentParser) -> None:
    text = doc.read_text(encoding="utf-8")
    assert check_text(text, parser, doc.relative_to(ROOT).as_posix()) == []


def test_the_docs_name_commands_at_all(parser: argparse.ArgumentParser) -> None:
    """The check is not vacuous: the README names the two main subcommands in code the checker reads."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    mentioned = [m["rest"].split()[0] for block in FENCE.finditer(readme) for line in logical_lines(block["body"])
                 if (m := COMMAND.search(line)) and m["rest"].split()]
    assert "run" in mentioned and "serve" in mentioned


def test_a_made_up_flag_fails(parser: argparse.ArgumentParser) -> None:
    text = "```bash\nresdeploy run examples/resdeploy.toml --out runs/x --turbo-mode\n```\n"
    assert check_text(text, parser) == ["text:1 (code block): `resdeploy run` has no flag --turbo-mode"]


def test_a_flag_of_another_subcommand_fails(parser: argparse.ArgumentParser) -> None:
    # --workers is a serve flag, not a run flag
    problems = check_text("Then `resdeploy run --workers 2` ...", parser)
    assert problems == ["text (inline `resdeploy run --workers 2`): `resdeploy run` has no flag --workers"]


def test_a_made_up_subcommand_and_nested_subcommand_fail(parser: argparse.ArgumentParser) -> None:
    text = ("```\n.venv/bin/resdeploy deploy model.onnx\nresdeploy experiment degradatoin --quick\n"
            "resdeploy experiment degradation \\\n    --quick --no-such-flag\n```\n")
    problems = check_text(text, parser)
    assert len(problems) == 3
    assert "`resdeploy deploy`: no such subcommand" in problems[0]
    assert "`resdeploy experiment degradatoin`: no such subcommand" in problems[1]
    assert problems[2].endswith("`resdeploy experiment degradation` has no flag --no-such-flag")


def test_a_made_up_inline_flag_fails_and_real_ones_pass(parser: argparse.ArgumentParser) -> None:
    text = "Use `--shutdown-timout 10` or `--shutdown-timeout 10`, `--workers auto`, `--server-cpus 0`, `--set a.b=1`."
    problems = check_text(text, parser)
    assert len(problems) == 1 and "--shutdown-timout is no flag" in problems[0]


def test_synopses_and_comments_are_read(parser: argparse.ArgumentParser) -> None:
    ok = ("```\nresdeploy run [CONFIG.toml] [--out DIR] [--checkpoint CK | --arch NAME --epochs N]"
          "  # --not-read-in-a-comment\nresdeploy serve repo/ --grpc-port=0\n# resdeploy run --commented-out\n```\n")
    assert check_text(ok, parser) == []
    bad = "```\nresdeploy run [--out DIR] [--checkpoint CK | --arch NAME --epoks N]\n```\n"
    assert check_text(bad, parser) == ["text:1 (code block): `resdeploy run` has no flag --epoks"]
