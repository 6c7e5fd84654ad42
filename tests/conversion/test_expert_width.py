"""Routed experts are padded with zero neurons to a width of a multiple of 8 (weight rows of a multiple of 16 bytes,
which grouped-GEMM kernels need): exactly the same model, and exports that transformers' default experts
implementation runs."""

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_moe.conversion import upcycle
from tests.conversion.dense_fixtures import load_moe, logits_of, read_tensors, tokens, write_dense


@pytest.fixture(scope="module")
def odd_dense(tmp_path_factory):
    """A dense FFN of 100 neurons: 4 random experts of 25 each."""
    return write_dense(tmp_path_factory.mktemp("dense100"), "llama2", intermediate_size=100)


def test_odd_widths_are_padded_with_inert_zero_neurons(odd_dense, tmp_path, monkeypatch):
    padded = upcycle(odd_dense, tmp_path / "padded", method="random", num_experts=4, top_k=2, progress=False)
    # the package's `upcycle` is the function; the module by its full name
    monkeypatch.setattr(importlib.import_module("llama_moe.conversion.pipeline"), "EXPERT_WIDTH_MULTIPLE", 1)
    exact = upcycle(odd_dense, tmp_path / "exact", method="random", num_experts=4, top_k=2, progress=False)
    model, reference = load_moe(padded), load_moe(exact)
    assert model.config.moe_intermediate_size == 32 and reference.config.moe_intermediate_size == 25
    torch.testing.assert_close(logits_of(model, tokens()), logits_of(reference, tokens()), atol=1e-5, rtol=1e-5)
    tensors = read_tensors(padded)
    gate_up, down = tensors["model.layers.0.mlp.experts.gate_up_proj"], tensors["model.layers.0.mlp.experts.down_proj"]
    assert gate_up.shape == (4, 64, 32) and down.shape == (4, 32, 32)
    assert not gate_up[:, 25:32].any() and not gate_up[:, 57:].any() and not down[..., 25:].any()
    exact_gate_up = read_tensors(exact)["model.layers.0.mlp.experts.gate_up_proj"]
    torch.testing.assert_close(gate_up[:, 32:57], exact_gate_up[:, 25:])
    card = open(f"{padded}/README.md").read()
    assert "25 neurons built, padded with zero neurons" in card


@pytest.mark.parametrize("format", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exports_run_with_transformers_default_experts(odd_dense, tmp_path, format, dtype):
    ours = load_moe(upcycle(odd_dense, tmp_path / "ours", method="random", num_experts=4, top_k=2, progress=False))
    out = upcycle(odd_dense, tmp_path / format, method="random", num_experts=4, top_k=2, format=format, progress=False)
    native = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    assert native.config._experts_implementation == "grouped_mm"  # transformers' default for these classes
    got = logits_of(native, tokens())
    if dtype == torch.float32:
        torch.testing.assert_close(got, logits_of(ours, tokens()), atol=1e-4, rtol=1e-4)
    else:
        assert torch.isfinite(got).all()
