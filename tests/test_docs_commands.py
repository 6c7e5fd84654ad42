"""The README and the guides stay true to the CLI: every `llama-moe` command in their shell blocks parses.

Each command is parsed with its subcommand's own parser (`llama-moe train` with training/arguments.py's
`parse_arguments`), the benchmark scripts they name exist with the flags they use, and relative links resolve.
Parses only: no model is loaded and nothing runs.
"""

import contextlib
import functools
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from llama_moe.cli.main import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Where benchmark commands are instructions to follow (the dated records in benchmarks/results/ are history).
BENCHMARK_DOCS = [*GUIDES, ROOT / "benchmarks" / "README.md"]
LINKED_DOCS = [*BENCHMARK_DOCS, ROOT / "CHANGELOG.md", *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
OPERATORS = {";", "&&", "||", "|", "&", "(", ")"}


def fenced_blocks(path: Path):
    """(language, first line number, lines) of every fenced code block."""
    block, language, start, fence = None, "", 0, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if block is None and match:
            block, language, start, fence = [], match.group(3).lower(), number + 1, match.group(2)
        elif block is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            yield language, start, block
            block = None
        elif block is not None:
            block.append(line)


def shell_lines(path: Path):
    """(line number, command line) in the shell blocks (and unlabelled blocks that run llama-moe), with
    backslash continuations joined."""
    for language, start, lines in fenced_blocks(path):
        text = "\n".join(lines)
        if language not in SHELL_LANGUAGES and not (language == "" and "llama-moe " in text):
            continue
        pending, first = "", None
        for offset, line in enumerate(lines):
            if first is None:
                first = start + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield first, pending + line
            pending, first = "", None
        if pending.strip():
            yield first, pending


def split_commands(line: str) -> list[list[str]]:
    """Words of each simple command on a shell line (split at ;, &&, ||, |), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, words = [], []
    for token in lexer:
        if token in OPERATORS:
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [command for command in commands + [words] if command]


def llama_moe_invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """(subcommand, arguments) for `llama-moe SUB ...` and `... -m llama_moe.cli.SUB ...` (torchrun, accelerate)."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value prefixes
    if words[:1] == ["llama-moe"]:
        return (words[1], words[2:]) if len(words) > 1 else ("", [])
    for index, word in enumerate(words[:-1]):
        if word == "-m" and words[index + 1].startswith("llama_moe.cli."):
            return words[index + 1].removeprefix("llama_moe.cli."), words[index + 2 :]
    return None


def documented_commands():
    found = []
    for path in GUIDES:
        for number, line in shell_lines(path):
            for words in split_commands(line):
                invocation = llama_moe_invocation(words)
                if invocation is not None:
                    found.append(pytest.param(path, number, *invocation, id=f"{path.relative_to(ROOT)}:{number}"))
    return found


@functools.cache
def cli_module(subcommand: str):
    return importlib.import_module(f"llama_moe.cli.{SUBCOMMANDS[subcommand][0]}")


def parse_error(subcommand: str, arguments: list[str]) -> str | None:
    """The parser's complaint about `llama-moe SUBCOMMAND ARGUMENTS`, or None when it parses."""
    if subcommand not in SUBCOMMANDS:
        return f"unknown subcommand {subcommand!r}; the CLI has {', '.join(SUBCOMMANDS)}"
    if subcommand == "train":
        if arguments[:1] in (["-h"], ["--help"], ["--help-all"]):
            return None
        from llama_moe.training.arguments import parse_arguments

        parse = parse_arguments
    else:
        module = cli_module(subcommand)
        if not hasattr(module, "build_parser"):
            return f"llama_moe.cli.{SUBCOMMANDS[subcommand][0]} has no build_parser() for this test to parse with"

        def parse(argv):
            return module.build_parser().parse_args(argv)

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parsed = parse(arguments)
    except SystemExit as exit_:
        return None if exit_.code == 0 else stderr.getvalue().strip() or f"exit code {exit_.code}"
    except (ValueError, FileNotFoundError) as error:
        return f"{type(error).__name__}: {error}"
    if subcommand == "upcycle":
        from llama_moe.conversion.methods import METHODS

        if parsed.method not in METHODS:
            return f"--method {parsed.method!r} is not one of {', '.join(METHODS)}"
    return None


@pytest.fixture
def parse_like_a_gpu_machine(monkeypatch):
    """GPU recipes set bf16, which transformers refuses on a machine without one: parse as on a GPU machine."""
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *args, **kwargs: True)
    monkeypatch.chdir(ROOT)  # recipe paths are relative to the repository root


@pytest.mark.parametrize(("path", "line", "subcommand", "arguments"), documented_commands())
def test_documented_command_parses(path, line, subcommand, arguments, parse_like_a_gpu_machine):
    error = parse_error(subcommand, arguments)
    command = shlex.join(["llama-moe", subcommand, *arguments])
    assert error is None, f"{path.relative_to(ROOT)}:{line}: `{command}` does not parse:\n{error}"


def test_readme_shows_every_subcommand():
    shown = {parameter.values[2] for parameter in documented_commands() if parameter.values[0].name == "README.md"}
    assert not set(SUBCOMMANDS) - shown, f"README.md has no example of {sorted(set(SUBCOMMANDS) - shown)}"


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= 200, f"README.md has {lines} lines; move details into docs/ (at most 200)"


def prose(path: Path) -> str:
    """The file without fenced blocks and link targets: what a reader reads as text."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^(```+|~~~+).*?^\1\s*$", "", text, flags=re.M | re.S)
    return re.sub(r"\]\([^)]*\)", "]", text)


@pytest.mark.parametrize("path", GUIDES, ids=lambda path: str(path.relative_to(ROOT)))
def test_guides_hold_no_history(path):
    """Issue numbers, dates and commit hashes belong in benchmarks/results/ and CHANGELOG.md."""
    text = prose(path)
    found = re.findall(r"\bissues? #?\d+", text, flags=re.I)
    found += re.findall(r"\b20\d\d-[01]\d-[0-3]\d\b", text)
    found += [
        word for word in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", word) and re.search(r"\d", word)
    ]
    assert not found, f"{path.relative_to(ROOT)} mentions {found}"


def benchmark_commands(path: Path):
    """(line number, words) of `python benchmarks/...` commands in shell blocks and in inline code."""
    for number, line in shell_lines(path):
        for words in split_commands(line):
            yield number, words
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for span in re.findall(r"`([^`]*benchmarks[/.][^`]*)`", line):
            if "..." not in span:
                for words in split_commands(span):
                    yield number, words


@pytest.mark.parametrize("path", BENCHMARK_DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_benchmark_scripts_exist_with_their_flags(path):
    problems = []
    for number, words in benchmark_commands(path):
        if words[:1] in (["python"], ["python3"], ["bash"]) and len(words) > 1:
            if words[1] == "-m" and len(words) > 2 and words[2].startswith("benchmarks."):
                script = ROOT / (words[2].replace(".", "/") + ".py")
                flags = words[3:]
            elif words[1].startswith("benchmarks/"):
                script, flags = ROOT / words[1], words[2:]
            else:
                continue
            if not script.is_file():
                problems.append(f"line {number}: {script.relative_to(ROOT)} does not exist")
                continue
            source = script.read_text(encoding="utf-8")
            for flag in (word.split("=", 1)[0] for word in flags if word.startswith("--")):
                if f'"{flag}"' not in source:
                    problems.append(f"line {number}: {script.relative_to(ROOT)} has no {flag} option")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for name in re.findall(r"\bbenchmarks/[\w/.-]+\.(?:py|sh)\b", line):
            if not (ROOT / name).is_file():
                problems.append(f"line {number}: {name} does not exist")
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(dict.fromkeys(problems))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> set[str]:
    text = re.sub(r"^(```+|~~~+).*?^\1\s*$", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


@pytest.mark.parametrize("path", LINKED_DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"^(```+|~~~+).*?^\1\s*$", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        name, _, anchor = target.partition("#")
        linked = (path.parent / name).resolve() if name else path
        if not linked.exists():
            problems.append(f"{target}: {name} does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)
