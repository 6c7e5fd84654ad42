"""Streaming domains (readers, packing, positions, held-out split) and mixture sampling (weights, dynamic rule,
resumable state)."""

import json
import math

import pytest

from llama_moe.training.data import DomainSpec, DomainStream, StreamPosition, iter_pieces, parse_domains
from llama_moe.training.mixture import MixtureDataset, dynamic_update, initial_weights


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_readers_text_folder_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("alpha\nbeta\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("gamma")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    with open(tmp_path / "c.jsonl", "w") as handle:
        handle.write(json.dumps({"content": "delta"}) + "\n\n" + json.dumps({"content": "eps"}) + "\n")
    pq.write_table(pa.table({"content": ["zeta", "eta"]}), tmp_path / "d.parquet")
    assert list(iter_pieces(DomainSpec("t", str(tmp_path / "a.txt")))) == [("alpha\nbeta\n", True)]
    pieces = list(iter_pieces(DomainSpec("f", str(tmp_path), text_field="content")))
    assert pieces == [
        ("alpha\nbeta\n", True),
        ("delta", True),
        ("eps", True),
        ("zeta", True),
        ("eta", True),
        ("gamma", True),
    ]
    with pytest.raises(ValueError, match="no field 'text'"):
        list(iter_pieces(DomainSpec("j", str(tmp_path / "c.jsonl"))))


def test_packing_joins_with_eos_and_resumes_at_any_block(tmp_path, tokenizer):
    docs = [f"document number {i} " + "word " * (i % 7 + 3) for i in range(60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stream = DomainStream(DomainSpec("d", str(path)), tokenizer, block_size=16, validation_blocks=2)
    expected = []
    for doc in docs:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream.validation == [expected[:16], expected[16:32]]  # held out: the first blocks
    blocks = stream.blocks()
    first = [next(blocks) for _ in range(9)]
    assert [b for b, _ in first] == [expected[32 + 16 * i : 48 + 16 * i] for i in range(9)]
    # Restarting from the position saved after any block gives exactly the following blocks.
    for i in (0, 3, 6):
        again = stream.blocks(first[i][1])
        assert [next(again)[0] for _ in range(2)] == [first[i + 1][0], first[i + 2][0]]
    # After the data runs out, the next epoch starts right after the held-out blocks.
    per_epoch = (len(expected) - 32) // 16
    more = [next(blocks) for _ in range(per_epoch - 8)]
    assert more[-1][1].epoch == 1 and more[-1][0] == first[0][0]


def test_large_text_file_streams_in_pieces(tmp_path, tokenizer):
    path = tmp_path / "big.txt"
    path.write_text("line of text that repeats\n" * 12000)  # ~300k characters: several 64k pieces
    pieces = list(iter_pieces(DomainSpec("big", str(path))))
    assert len(pieces) >= 4 and [end for _, end in pieces].count(True) == 1 and pieces[-1][1]
    stream = DomainStream(DomainSpec("big", str(path)), tokenizer, block_size=32, validation_blocks=1)
    blocks = stream.blocks()
    block, position = next(blocks)
    assert len(block) == 32 and position.piece == 0


def test_parse_domains_and_weight_errors():
    specs = parse_domains(["code=/a", {"name": "docs", "path": "/b", "weight": 2}])
    assert [(s.name, s.path, s.weight) for s in specs] == [("code", "/a", None), ("docs", "/b", 2)]
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_domains(["nopath"])
    with pytest.raises(ValueError, match="unique"):
        parse_domains(["a=/x", "a=/y"])
    assert initial_weights("static", ["a", "b"], {"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}
    assert initial_weights("uniform", ["a", "b"], {}) == {"a": 0.5, "b": 0.5}
    assert initial_weights("proportional", ["a", "b"], {}, lambda: [10, 30]) == {"a": 0.25, "b": 0.75}
    with pytest.raises(ValueError, match="positive"):
        initial_weights("static", ["a", "b"], {"a": 0, "b": 0})
    with pytest.raises(ValueError, match="unknown domains"):
        initial_weights("static", ["a"], {"a": 1, "zz": 1})
    with pytest.raises(ValueError, match="no weight for domains"):
        initial_weights("static", ["a", "b"], {"a": 1})


def test_dynamic_update_matches_the_formula():
    weights, losses, refs = {"a": 0.6, "b": 0.4}, {"a": 2.0, "b": 3.5}, {"a": 2.5, "b": 3.0}
    got = dynamic_update(weights, losses, refs, eta=2.0, smoothing=0.1)
    raw = {"a": 0.6 * math.exp(0.0), "b": 0.4 * math.exp(2.0 * 0.5)}  # a is ahead of its reference: no boost
    total = sum(raw.values())
    expected = {k: 0.9 * v / total + 0.1 / 2 for k, v in raw.items()}
    assert got == pytest.approx(expected)
    assert sum(got.values()) == pytest.approx(1.0)
    huge = dynamic_update(weights, {"a": 1e6, "b": 0.0}, {"a": 0.0, "b": 0.0}, eta=10.0, smoothing=0.0)
    assert huge == pytest.approx({"a": 1.0, "b": 0.0})  # no overflow


class _CountingStream:
    """Stand-in for DomainStream: block i of domain d is [d, i]."""

    def __init__(self, tag):
        self.tag = tag

    def blocks(self, position=None):
        start = 0 if position is None else position.piece
        i = start
        while True:
            i += 1
            yield [self.tag, i - 1], StreamPosition(0, i, 0)


def test_mixture_state_replays_prefetched_draws_exactly():
    streams = {"a": _CountingStream(0), "b": _CountingStream(1)}
    full = MixtureDataset(streams, {"a": 0.3, "b": 0.7}, seed=5)
    iterator = iter(full)
    taken = [next(iterator)["input_ids"] for _ in range(10)]
    prefetched = [next(iterator)["input_ids"] for _ in range(3)]  # drawn by the loader, not yet trained on
    state = json.loads(json.dumps(full.state_at(10)))
    full.weights = {"a": 0.9, "b": 0.1}  # weights change after the prefetch (an evaluation)
    later = [next(iterator)["input_ids"] for _ in range(20)]

    resumed = MixtureDataset(streams, {"a": 0.5, "b": 0.5}, seed=5)
    resumed.load_state(state)
    resumed.weights = {"a": 0.9, "b": 0.1}
    again = iter(resumed)
    assert [next(again)["input_ids"] for _ in range(23)] == prefetched + later
    assert len({tuple(x) for x in taken + prefetched + later}) == 33  # no block twice
