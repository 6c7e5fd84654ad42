"""The quickstart's embedded corpus: two non-empty domains from the installed standard library, held-out
documents never in the training file, and the same files on every run."""

import json

from llama_moe.conversion.stdlib_corpus import build_stdlib_corpus


def _texts(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_stdlib_corpus_domains_are_real_disjoint_and_deterministic(tmp_path):
    first = build_stdlib_corpus(tmp_path / "a", max_train_bytes=200_000, max_heldout_bytes=40_000)
    second = build_stdlib_corpus(tmp_path / "b", max_train_bytes=200_000, max_heldout_bytes=40_000)
    assert sorted(first) == ["code", "docs"]
    for name, domain in first.items():
        train, heldout = _texts(domain.train), _texts(domain.heldout)
        assert train and heldout
        assert not set(train) & set(heldout)
        assert domain.train_bytes <= 200_000 and domain.heldout_bytes <= 40_000
        assert domain.train.read_bytes() == second[name].train.read_bytes()
    assert any("def " in text and "import" in text for text in _texts(first["code"].train))
    prose = " ".join(_texts(first["docs"].train))
    assert prose.count(" the ") > 100  # English prose, not code
