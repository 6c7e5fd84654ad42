"""The unseen domain: English prose that no calibration or training path of ours reads, to measure how far an
upcycled model generalizes beyond the text it was carved and trained on.

The text is "Botchan (Master Darling)" by Natsume Soseki, translated by Yasotaro Morri (1919): Project Gutenberg
eBook #8868, public domain, shipped unmodified with its license as `tasks/botchan.txt` (the copy the sentencepiece
source package carries as `test/botchan.txt`). Narrative fiction, another kind of text than the Python sources and
reference docs of the embedded corpus. It lives in evaluation/, which conversion and training never import
(tests/test_import_graph.py), so no default calibration or training path can reach it. Chapters I-II are the
perplexity text; the cloze task (`llama_moe_prose_cloze`, built by tasks/build_tasks.py) uses chapters III-XI only.
Must not be read by anything that builds or trains a model.
"""

import json
import re
from pathlib import Path

BOOK = Path(__file__).resolve().parent / "tasks" / "botchan.txt"
UNSEEN_DOMAIN = "unseen-prose"  # the domain's name in every table and file
CLOZE_TASK = "llama_moe_prose_cloze"
DESCRIPTION = (
    "English narrative prose that calibration and training never read: Botchan by Natsume Soseki, "
    "tr. Y. Morri, 1919 (Project Gutenberg #8868, public domain)"
)
PERPLEXITY_CHAPTERS = 2  # chapters I-II score perplexity; the cloze task is built from the rest

_CHAPTER = re.compile(r"^CHAPTER [IVXL]+\.?$")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"'A-Z])")  # keeps closing quotes


def chapters() -> list[str]:
    """The novel's chapters as plain text (wrapped lines joined, footnotes and transcriber's marks removed)."""
    lines = BOOK.read_text(encoding="utf-8-sig").splitlines()
    start = next(i for i, line in enumerate(lines) if _CHAPTER.match(line.strip()))
    end = next(i for i, line in enumerate(lines) if line.strip() == "--(THE END)--")
    found, current, in_footnote = [], [], False
    for line in lines[start:end]:
        line = line.strip()
        if _CHAPTER.match(line):
            if current:
                found.append(current)
            current = []
            continue
        if line.startswith("[Footnote"):
            in_footnote = True
        if in_footnote:
            in_footnote = not line.endswith("]")
            continue
        if line:
            current.append(re.sub(r"\[[A-Z0-9]+\]", "", line))
    found.append(current)
    return [" ".join(" ".join(chapter).split()) for chapter in found]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def perplexity_text() -> str:
    return "\n\n".join(chapters()[:PERPLEXITY_CHAPTERS])


def cloze_chapters() -> list[str]:
    return chapters()[PERPLEXITY_CHAPTERS:]


def write_unseen_domain(folder: Path) -> Path:
    """`folder/heldout.jsonl`: the unseen domain's perplexity text, one chapter per document."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "heldout.jsonl"  # rewritten whole each time: the content never changes
    rows = "".join(json.dumps({"text": chapter}) + "\n" for chapter in chapters()[:PERPLEXITY_CHAPTERS])
    path.write_text(rows, encoding="utf-8")
    return path
