"""Layer-wise calibration: the streamed dense model gives exactly the FFN inputs of the whole model, goes on
through whatever FFN was built, and the default calibration text never includes a held-out document."""

import pytest
import torch

from llama_moe.conversion.calibration import LayerwiseCalibration, check_calibration_file, corpus_text
from llama_moe.conversion.reader import open_dense
from tests.conversion.dense_fixtures import load_dense, tokens, write_dense


@pytest.fixture(scope="module", params=["llama2", "llama3"])
def dense_dir(tmp_path_factory, request):
    return write_dense(tmp_path_factory.mktemp("dense") / request.param, request.param)


def captured_ffn_inputs(model, ids):
    captured = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return captured


def test_streamed_layers_match_the_dense_model(dense_dir):
    ids = tokens(batch=5, length=16)
    model = load_dense(dense_dir)
    expected = captured_ffn_inputs(model, ids)
    calibration = LayerwiseCalibration(open_dense(dense_dir), ids, batch_size=2)
    for layer in range(model.config.num_hidden_layers):
        got = calibration.ffn_inputs(layer)
        torch.testing.assert_close(got, expected[layer].reshape(-1, got.shape[-1]), atol=1e-5, rtol=1e-5)
        calibration.finish(layer, model.model.layers[layer].mlp)


def test_later_layers_see_the_built_ffn(dense_dir):
    ids = tokens(batch=2, length=16)
    model = load_dense(dense_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()  # layer 0's FFN replaced by one that outputs zero
    expected = captured_ffn_inputs(model, ids)
    calibration = LayerwiseCalibration(open_dense(dense_dir), ids)
    calibration.ffn_inputs(0)
    calibration.finish(0, torch.zeros_like)
    got = calibration.ffn_inputs(1)  # layer 1 runs on what layer 0 really gave
    torch.testing.assert_close(got, expected[1].reshape(-1, got.shape[-1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already passed layer 0"):
        calibration.ffn_inputs(0)


def test_default_calibration_text_is_training_split_only():
    import itertools

    from llama_moe.conversion.stdlib_corpus import HELDOUT_EVERY, _is_heldout, training_documents

    documents = list(itertools.islice(training_documents(), 40))
    assert not any(_is_heldout(doc, HELDOUT_EVERY) for doc in documents)
    assert any(doc.startswith("# ") and "def " in doc for doc in documents)  # code
    assert any(doc.count(" the ") > 3 and "def " not in doc[:200] for doc in documents)  # prose
    text = corpus_text(50_000)
    assert len(text) >= 50_000 and text.startswith(documents[0])


def test_calibration_file_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_calibration_file(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no text"):
        check_calibration_file(str(empty))
