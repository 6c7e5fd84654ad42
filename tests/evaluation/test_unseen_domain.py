"""The unseen domain: English prose that calibration and training never read. Its perplexity text and its cloze
task come from different chapters (tests/evaluation/test_tasks.py rebuilds the task exactly), and no default
calibration or training path of ours can reach the book."""

import json

from llama_moe.evaluation.lm_eval_runner import local_tasks_dir
from llama_moe.evaluation.unseen_domain import (
    BOOK,
    CLOZE_TASK,
    UNSEEN_DOMAIN,
    chapters,
    cloze_chapters,
    perplexity_text,
    sentences,
    write_unseen_domain,
)


def cloze_rows() -> list[dict]:
    return [json.loads(line) for line in (local_tasks_dir() / "prose_cloze.jsonl").read_text().splitlines()]


def test_book_is_the_novel_without_project_gutenberg_boilerplate():
    text = " ".join(chapters())
    assert len(chapters()) == 11 and 40_000 < len(text.split()) < 60_000
    assert text.startswith("Because of an hereditary recklessness")
    assert "Gutenberg" not in text and "[Footnote" not in text
    assert "Project Gutenberg License" in BOOK.read_text(encoding="utf-8-sig")  # shipped with its license


def test_perplexity_text_and_cloze_items_come_from_different_chapters(tmp_path):
    path = write_unseen_domain(tmp_path)
    documents = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert documents == perplexity_text().split("\n\n") and len(" ".join(documents).split()) > 6000
    rows = cloze_rows()
    assert len(rows) == 1000
    cloze_text = " ".join(cloze_chapters())
    for row in rows[:200]:
        assert row["context"] in cloze_text and row["context"] not in perplexity_text()
        assert len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
        assert cloze_text.find(row["context"] + " " + row["choices"][row["label"]]) >= 0


def test_no_default_calibration_or_training_text_holds_the_book(tmp_path):
    from llama_moe.conversion.calibration import corpus_text
    from llama_moe.conversion.stdlib_corpus import build_stdlib_corpus

    probes = [s for s in sentences(" ".join(chapters())) if len(s) > 60][::50]
    assert len(probes) > 20
    calibration = corpus_text(2_000_000)
    corpus = build_stdlib_corpus(tmp_path / "data")
    training = "".join(domain.train.read_text() + domain.heldout.read_text() for domain in corpus.values())
    for probe in probes:
        assert probe not in calibration and json.dumps(probe)[1:-1] not in training


def test_task_is_a_local_lm_eval_task():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(local_tasks_dir()), include_defaults=False)
    docs = list(manager.load([CLOZE_TASK])["tasks"][CLOZE_TASK].test_docs())
    assert len(docs) == 1000 and docs[0]["choices"][docs[0]["label"]] in docs[0]["choices"]
    assert UNSEEN_DOMAIN == "unseen-prose"
