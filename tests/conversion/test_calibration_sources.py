"""The calibration mixture: sources by name (the embedded corpus, text the dense model samples itself, files),
an equal share of tokens each, one clear error for a bad mixture before any work, and a model card that names
files by name and content hash, never by a path of the user's machine."""

import json

import pytest
import torch

from llama_moe.conversion.calibration import (
    DEFAULT_SOURCES,
    SEQUENCE_LENGTH,
    CalibrationSource,
    mixture_blocks,
    parse_calibration_sources,
)
from llama_moe.conversion.generated_text import sample_texts
from llama_moe.conversion.reader import open_dense
from tests.conftest import tiny_tokenizer
from tests.conversion.dense_fixtures import write_dense


def words(count: int, offset: int = 0) -> str:
    return " ".join(f"w{(offset + i) % 100}" for i in range(count))


def test_default_is_the_corpus_and_the_models_own_text():
    assert [s.name for s in parse_calibration_sources(None)] == list(DEFAULT_SOURCES) == ["corpus", "generated"]
    assert all(s.path is None for s in parse_calibration_sources(None))


def test_files_by_path_or_by_name(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("some text")
    sources = parse_calibration_sources(["corpus", str(notes), f"mine={notes}"])
    assert sources == [
        CalibrationSource("corpus"),
        CalibrationSource("notes", str(notes)),
        CalibrationSource("mine", str(notes)),
    ]
    assert parse_calibration_sources(str(notes)) == [CalibrationSource("notes", str(notes))]


@pytest.mark.parametrize(
    "specs, match",
    [
        (["corpus", "corpus"], r"names \['corpus'\] more than once"),
        (["a=x.txt", "a=y.txt"], "does not exist"),  # files are checked first, then names
        ([], "is empty"),
        (["missing.txt"], "missing.txt does not exist"),
    ],
)
def test_bad_mixtures_are_refused_with_one_clear_error(specs, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        parse_calibration_sources(specs)


def test_a_name_given_twice_for_two_files(tmp_path):
    for name in ("x.txt", "y.txt"):
        (tmp_path / name).write_text("text")
    with pytest.raises(ValueError, match=r"names \['a'\] more than once"):
        parse_calibration_sources([f"a={tmp_path / 'x.txt'}", f"a={tmp_path / 'y.txt'}"])


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="holds no text"):
        parse_calibration_sources([str(tmp_path / "empty.jsonl")])


def test_each_source_gives_an_equal_share_of_whole_blocks(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(words(5000))
    b.write_text(words(5000, offset=50))
    tokenizer = tiny_tokenizer()
    blocks = mixture_blocks(parse_calibration_sources([str(a), str(b)]), 4 * SEQUENCE_LENGTH, None, tokenizer, 0)
    assert blocks.shape == (4, SEQUENCE_LENGTH)
    first = tokenizer(words(2 * SEQUENCE_LENGTH), add_special_tokens=False).input_ids
    second = tokenizer(words(2 * SEQUENCE_LENGTH, offset=50), add_special_tokens=False).input_ids
    assert blocks[:2].reshape(-1).tolist() == first and blocks[2:].reshape(-1).tolist() == second


def test_too_small_a_mixture_is_refused(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text(words(5000))
    sources = parse_calibration_sources([str(a), "corpus"])
    with pytest.raises(ValueError, match="gives each 200 tokens; each needs at least 256"):
        mixture_blocks(sources, 400, None, tiny_tokenizer(), 0)
    (tmp_path / "short.txt").write_text(words(100))
    with pytest.raises(ValueError, match="source 'short' gives 100 tokens"):
        mixture_blocks(parse_calibration_sources([str(tmp_path / "short.txt")]), 1024, None, tiny_tokenizer(), 0)


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    folder = write_dense(tmp_path_factory.mktemp("dense") / "llama3", "llama3", vocab_size=128)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_generated_text_comes_from_the_dense_model_and_its_seed(tiny_dense):
    source = open_dense(tiny_dense)
    model, tokenizer = source.dense_model(), source.load_tokenizer()
    first = sample_texts(model, tokenizer, 300, seed=1, progress=False)
    assert first == sample_texts(model, tokenizer, 300, seed=1, progress=False)
    assert first != sample_texts(model, tokenizer, 300, seed=2, progress=False)
    assert sum(len(tokenizer(text).input_ids) for text in first) >= 300
    state = torch.random.get_rng_state()
    sample_texts(model, tokenizer, 10, seed=3, progress=False)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is left alone
    blocks = mixture_blocks(parse_calibration_sources(["generated"]), SEQUENCE_LENGTH, source, tokenizer, seed=1)
    expected = tokenizer(
        "\n\n".join(sample_texts(model, tokenizer, SEQUENCE_LENGTH, seed=1, progress=False)), add_special_tokens=False
    ).input_ids[:SEQUENCE_LENGTH]
    assert blocks.reshape(-1).tolist() == expected


def test_model_card_names_files_by_name_and_hash_not_path(tmp_path):
    notes = tmp_path / "private" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("calibration text")
    described = [s.describe() for s in parse_calibration_sources(["corpus", str(notes), f"mine={notes}"])]
    assert described[0].startswith("corpus (the embedded corpus")
    assert described[1].startswith("notes.txt (sha256 ") and described[2].startswith("mine=notes.txt (sha256 ")
    assert not any(str(tmp_path) in text for text in described)


def test_sample_command_writes_the_models_text_for_calibration_and_replay(tiny_dense, tmp_path, capsys):
    from llama_moe.cli.main import main

    out = tmp_path / "generated.jsonl"
    assert main(["sample", tiny_dense, str(out), "--tokens", "300", "--seed", "1"]) == 0
    documents = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    source = open_dense(tiny_dense)
    assert documents == sample_texts(source.dense_model(), source.load_tokenizer(), 300, seed=1, progress=False)
    assert main(["sample", tiny_dense, str(out)]) == 2  # an existing output needs --overwrite
    assert "already exists" in capsys.readouterr().err
    assert parse_calibration_sources([f"generated={out}"]) == [CalibrationSource("generated", str(out))]
