"""Builds the local lm-eval tasks' JSONL data: from the Python standard library's own source and docstrings, and
a cloze task from the unseen domain's prose (evaluation/unseen_domain.py).

Deterministic for a given Python version (sources parsed with `ast`, never imported; fixed seeds, sorted
files). Run it only to regenerate the committed JSONL files: `python evaluation/tasks/build_tasks.py`.
"""

import ast
import json
import os
import random
import re
import sys
import sysconfig
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_BYTES = 190_000  # keep every shipped file under 200 KB

# Folders of the standard library that are tests, demos or vendored data rather than library code.
SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "site-packages",
    "ensurepip",
    "__pycache__",
    "pydoc_data",
    "config-3.11-x86_64-linux-gnu",
    "venv",
    "distutils",
}


def stdlib_files(stdlib: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        files += [Path(root) / n for n in sorted(names) if n.endswith(".py") and not n.startswith("_")]
    return sorted(files)


def module_name(path: Path, stdlib: Path) -> str:
    parts = list(path.relative_to(stdlib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse(path: Path):
    try:
        source = path.read_text(encoding="utf-8")
        return source, ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None, None


def first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def docstring_mc(modules, rnd: random.Random, count: int) -> list[dict]:
    """'Which function does this docstring describe?' with four function names of the same module."""
    candidates = []
    for name, tree in modules:
        functions = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    functions[node.name] = first_paragraph(doc)
        if len(functions) < 4:
            continue
        for function, doc in sorted(functions.items()):
            # Hide the answer when the docstring names its own function.
            doc = re.sub(rf"\b{re.escape(function)}\b", "this function", doc)
            if 40 <= len(doc) <= 400:
                candidates.append((name, function, doc, sorted(functions)))
    rnd.shuffle(candidates)
    rows = []
    for name, function, doc, names in candidates[:count]:
        choices = rnd.sample([n for n in names if n != function], 3) + [function]
        rnd.shuffle(choices)
        rows.append({"module": name, "docstring": doc, "choices": choices, "label": choices.index(function)})
    return rows


def next_line_mc(sources, rnd: random.Random, count: int) -> list[dict]:
    """Six lines of real stdlib code; which of four lines from the same file comes next?"""
    rows = []
    files = list(sources)
    rnd.shuffle(files)
    for name, source in files:
        lines = [line.rstrip() for line in source.splitlines()]
        code = [i for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("#")]
        pool = sorted({lines[i].strip() for i in code if 12 <= len(lines[i].strip()) <= 80})
        if len(code) < 40 or len(pool) < 20:
            continue
        for _ in range(2):  # two windows per file keeps the set diverse
            start = rnd.randrange(0, len(code) - 7)
            window = [lines[i] for i in code[start : start + 7]]
            answer = window[-1].strip()
            if not 12 <= len(answer) <= 80 or any('"""' in w or "'''" in w for w in window):
                continue
            indent = window[-1][: len(window[-1]) - len(window[-1].lstrip())]
            distractors = rnd.sample([p for p in pool if p != answer], 3)
            # Every choice gets the true line's indentation, so indentation gives nothing away.
            choices = [indent + line for line in distractors + [answer]]
            answer = indent + answer
            rnd.shuffle(choices)
            rows.append(
                {"module": name, "context": "\n".join(window[:-1]), "choices": choices, "label": choices.index(answer)}
            )
        if len(rows) >= count:
            break
    return rows[:count]


def module_docs(modules, rnd: random.Random, count: int) -> list[dict]:
    """Module docstrings (real English prose about Python) for rolling log-likelihood / perplexity."""
    rows = []
    for name, tree in modules:
        doc = ast.get_docstring(tree)
        if doc and 300 <= len(doc) <= 2500:
            rows.append({"module": name, "text": doc.strip()})
    rnd.shuffle(rows)
    return rows[:count]


CLOZE_CONTEXT_WORDS = 40  # words of the story before the blank (whole sentences, then the sentence's start)
# Answers and distractors are words the novel uses at least this often: common words are one token in the usual
# vocabularies, so lm-eval scores the four choices of an item with one forward pass of its passage.
CLOZE_MIN_WORD_COUNT = 3


def prose_cloze(rnd: random.Random, count: int) -> list[dict]:
    """LAMBADA-style: a passage of the unseen novel up to the last word of a sentence; which of four words ends it?
    Distractors are other sentence-final words of the novel (same capitalization, none in the passage)."""
    from llama_moe.evaluation.unseen_domain import cloze_chapters, sentences

    counts = Counter(re.findall(r"[A-Za-z]+", " ".join(cloze_chapters())))
    items = []
    for chapter in cloze_chapters():
        chapter_sentences = sentences(chapter)
        for i, sentence in enumerate(chapter_sentences):
            match = re.fullmatch(r"(.*\S)\s+([A-Za-z]{3,})([.!?]+[\"']?)", sentence)
            if match is None or i == 0 or counts[match.group(2)] < CLOZE_MIN_WORD_COUNT:
                continue
            before, words = [], 0
            for previous in reversed(chapter_sentences[:i]):
                if words >= CLOZE_CONTEXT_WORDS:
                    break
                before.insert(0, previous)
                words += len(previous.split())
            items.append((" ".join(before + [match.group(1)]), match.group(2)))
    pool = sorted({word for _, word in items})
    rnd.shuffle(items)
    rows = []
    for context, word in items:
        seen = {w.lower() for w in re.findall(r"[A-Za-z]+", context)} | {word.lower()}
        candidates = [w for w in pool if w.lower() not in seen and w[0].isupper() == word[0].isupper()]
        if len(candidates) < 3:
            continue
        choices = rnd.sample(candidates, 3) + [word]
        rnd.shuffle(choices)
        rows.append({"context": context, "choices": choices, "label": choices.index(word)})
        if len(rows) == count:
            break
    return rows


def write_jsonl(rows: list[dict], path: Path, max_bytes: int = MAX_BYTES) -> None:
    data = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    while len(data.encode()) > max_bytes:  # trim from the end until under the size cap
        rows = rows[: int(len(rows) * 0.9)]
        data = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data, encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {len(rows)} rows, {len(data.encode()) // 1024} KiB -> {path.name}")


def main(argv: list[str] | None = None) -> int:
    """`build_tasks.py [OUTPUT_DIR]` (default: this folder)."""
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else HERE
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules, sources = [], []
    for path in stdlib_files(stdlib):
        source, tree = parse(path)
        if tree is not None:
            modules.append((module_name(path, stdlib), tree))
            sources.append((module_name(path, stdlib), source))
    print(f"Python {sys.version.split()[0]} standard library: {len(modules)} modules from {stdlib}")
    write_jsonl(docstring_mc(modules, random.Random(1234), 400), out / "stdlib_docstring_mc.jsonl")
    write_jsonl(next_line_mc(sources, random.Random(1235), 300), out / "stdlib_next_line_mc.jsonl")
    write_jsonl(module_docs(modules, random.Random(1236), 150), out / "stdlib_docs_ppl.jsonl")
    write_jsonl(prose_cloze(random.Random(1237), 1000), out / "prose_cloze.jsonl", max_bytes=700_000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
