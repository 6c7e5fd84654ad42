"""write_dense_checkpoint: a dense source (here an in-memory model, as a dequantized GGUF is) written as a plain
float32 folder that loads with the same logits, tied embeddings kept, atomically."""

import os

import pytest
import torch

from llama_moe.conversion.reader import open_dense, write_dense_checkpoint
from tests.conversion.dense_fixtures import load_dense, logits_of, tokens, write_dense


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_dense_copy_loads_with_the_same_logits(tmp_path, style):
    model = load_dense(write_dense(tmp_path / "src", style))
    out = write_dense_checkpoint(open_dense(model), str(tmp_path / "copy"))
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]
    copy = load_dense(out)
    ids = tokens()
    torch.testing.assert_close(logits_of(copy, ids), logits_of(model, ids), rtol=0, atol=0)
    tied = copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()
    assert tied == (style == "llama3")
    with pytest.raises(ValueError, match="already exists"):
        write_dense_checkpoint(open_dense(model), out)
    assert [f for f in os.listdir(tmp_path) if ".tmp-" in f] == []
