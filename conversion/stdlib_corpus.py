"""The quickstart's embedded multi-domain corpus, built from text every Python installation carries.

Two domains: `code` (the standard library's own Python sources) and `docs` (English prose: the Python Language
Reference topics shipped in `pydoc_data.topics`, then the standard library's docstrings, read with `ast`).
Documents are split into training and held-out files by a stable hash, so no held-out document is ever trained on.
Must not download anything.
"""

import ast
import itertools
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

HELDOUT_EVERY = 10  # one document in ten (by a stable hash) is held out

# Standard-library folders that are tests, demos or vendored data rather than library code.
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "site-packages",
    "ensurepip",
    "__pycache__",
    "pydoc_data",
    "venv",
    "distutils",
    "tkinter",
}


@dataclass
class CorpusDomain:
    name: str
    train: Path
    heldout: Path
    train_bytes: int
    heldout_bytes: int
    description: str


def _stdlib_sources(max_file_bytes: int = 60_000):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(names):
            path = Path(root) / name
            if name.endswith(".py") and 200 < path.stat().st_size <= max_file_bytes:
                yield path.relative_to(stdlib), path.read_text(encoding="utf-8", errors="replace")


def _code_documents():
    for relative, text in _stdlib_sources():
        yield f"# {relative}\n{text}"


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    docs = (ast.get_docstring(node) for node in nodes)
    return [doc.strip() for doc in docs if doc and len(doc.split()) >= 8]


def _docs_documents():
    for key in sorted(topics):
        text = topics[key].strip()
        if len(text) > 200:
            yield text
    for _, source in _stdlib_sources():
        docs = _docstrings(source)
        if sum(len(doc) for doc in docs) > 200:
            yield "\n\n".join(docs)


def _is_heldout(text: str, every: int) -> bool:
    return zlib.crc32(text.encode("utf-8", "replace")) % every == 0


def training_documents(heldout_every: int = HELDOUT_EVERY):
    """The training split's documents, code and docs alternating (calibration text that never touches the
    held-out documents)."""
    code = (t for t in _code_documents() if not _is_heldout(t, heldout_every))
    docs = (t for t in _docs_documents() if not _is_heldout(t, heldout_every))
    for pair in itertools.zip_longest(code, docs):
        yield from (text for text in pair if text is not None)


def _write_split(documents, folder: Path, max_train_bytes: int, max_heldout_bytes: int, heldout_every: int):
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": 0, "heldout": 0}
    limits = {"train": max_train_bytes, "heldout": max_heldout_bytes}
    with (
        open(folder / "train.jsonl", "w", encoding="utf-8") as train,
        open(folder / "heldout.jsonl", "w", encoding="utf-8") as heldout,
    ):
        for text in documents:
            split = "heldout" if _is_heldout(text, heldout_every) else "train"
            if sizes[split] + len(text) > limits[split]:
                if all(sizes[s] >= limits[s] * 0.9 for s in sizes):
                    break
                continue
            (heldout if split == "heldout" else train).write(json.dumps({"text": text}) + "\n")
            sizes[split] += len(text)
    return sizes


def build_stdlib_corpus(
    out_dir, max_train_bytes: int = 3_000_000, max_heldout_bytes: int = 300_000, heldout_every: int = HELDOUT_EVERY
) -> dict[str, CorpusDomain]:
    """Write `out_dir/<domain>/{train,heldout}.jsonl` (a "text" field per document) and describe them."""
    out_dir = Path(out_dir)
    sources = {
        "code": (_code_documents(), "Python standard library source files (this interpreter's own Lib/)"),
        "docs": (_docs_documents(), "Python Language Reference and library topics in English (pydoc_data.topics)"),
    }
    domains = {}
    for name, (documents, description) in sources.items():
        folder = out_dir / name
        sizes = _write_split(documents, folder, max_train_bytes, max_heldout_bytes, heldout_every)
        if sizes["train"] == 0 or sizes["heldout"] == 0:
            raise ValueError(f"the embedded corpus domain {name!r} came out empty; is the standard library complete?")
        domains[name] = CorpusDomain(
            name, folder / "train.jsonl", folder / "heldout.jsonl", sizes["train"], sizes["heldout"], description
        )
    return domains
