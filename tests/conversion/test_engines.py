"""Serving-engine rules: which engine computes which export exactly, refusals that name the engine, and the
Qwen2-MoE export written so that llama.cpp's qwen2moe can run it (untied output, a gate it can divide by)."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2MoeForCausalLM

from llama_moe.cli.main import main
from llama_moe.conversion.engines import ENGINES, engine_refusal, engine_support
from llama_moe.conversion.formats import export_checkpoint, formats_that_fit, get_exporter
from tests.conftest import tiny_moe_config
from tests.conversion.test_formats import _all_tensors, _saved_moe


def _gate_logits(model, input_ids):
    """The shared-expert gate's logits g of every MoE layer (what llama.cpp divides by)."""
    seen = []
    hooks = [
        layer.mlp.shared_expert_gate.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
        for layer in model.model.layers
        if hasattr(layer.mlp, "shared_expert_gate")
    ]
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()
    return torch.cat([g.flatten() for g in seen])


@pytest.mark.parametrize("shared", [48, 0], ids=["ungated_shared_expert", "no_shared_expert"])
def test_qwen2_moe_export_has_an_untied_head_and_a_gate_that_is_exactly_one_half_but_never_zero(tmp_path, shared):
    ours, src = _saved_moe(
        tmp_path, shared_expert_intermediate_size=shared, norm_topk_prob=False, tie_word_embeddings=True
    )
    out = tmp_path / "qwen2_moe"
    export_checkpoint(src, out, "qwen2_moe", engine="llama.cpp")
    config = json.loads((out / "config.json").read_text())
    written = _all_tensors(out)
    assert config["tie_word_embeddings"] is False  # llama.cpp's qwen2moe requires output.weight
    assert torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])

    qwen = Qwen2MoeForCausalLM.from_pretrained(out).eval()
    input_ids = torch.randint(0, ours.config.vocab_size, (2, 13))
    g = _gate_logits(qwen, input_ids)
    assert g.numel() == 2 * 13 * ours.config.num_hidden_layers
    assert torch.all(g != 0)
    assert torch.all(torch.sigmoid(g) == 0.5)  # transformers' and vLLM's gate
    assert torch.all(F.silu(g) / g == 0.5)  # llama.cpp's: ggml_div(ggml_silu(g), g)
    with torch.no_grad():
        torch.testing.assert_close(qwen(input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-5)
        g16 = _gate_logits(qwen.to(torch.bfloat16), input_ids)
    assert torch.all(g16 != 0) and torch.all(torch.sigmoid(g16) == 0.5)


def test_every_engine_has_a_row_for_every_format():
    config = tiny_moe_config()
    for format_name in ("llama_moe", "mixtral", "qwen2_moe"):
        assert [row.engine for row in engine_support(format_name, config)] == list(ENGINES)
    assert all(row.exact for row in engine_support("mixtral", config))


def test_llama_cpp_qwen2_moe_limits_are_named():
    renormalized = tiny_moe_config(shared_expert_intermediate_size=48)  # norm_topk_prob defaults to True
    assert "never renormalizes" in engine_refusal("qwen2_moe", renormalized, "llama.cpp")
    assert engine_refusal("qwen2_moe", renormalized, "vllm") is None
    partial = tiny_moe_config(shared_expert_intermediate_size=48, norm_topk_prob=False, moe_layers=[1])
    assert "every layer" in engine_refusal("qwen2_moe", partial, "llama.cpp")
    fits = tiny_moe_config(shared_expert_intermediate_size=48, norm_topk_prob=False)
    assert engine_refusal("qwen2_moe", fits, "llama.cpp") is None
    half = tiny_moe_config(shared_expert_intermediate_size=48, norm_topk_prob=False, dtype="float16")
    assert "float16" in engine_refusal("qwen2_moe", half, "llama.cpp")
    gated_half = tiny_moe_config(
        shared_expert_intermediate_size=48, norm_topk_prob=False, dtype="float16", shared_expert_gate=True
    )
    assert engine_refusal("qwen2_moe", gated_half, "llama.cpp") is None  # a learned gate is not tiny


def test_engine_refusal_names_the_engine_the_reason_and_the_formats_that_fit():
    renormalized = tiny_moe_config()
    with pytest.raises(
        ValueError,
        match=r"^llama.cpp cannot compute this qwen2_moe checkpoint.*renormalizes.*"
        r"Formats that llama.cpp serves for this configuration: \['mixtral', 'gguf'\]",
    ):
        get_exporter("qwen2_moe", renormalized, engine="llama.cpp")
    with pytest.raises(ValueError, match=r"^vLLM cannot compute this llama_moe checkpoint"):
        get_exporter("llama_moe", renormalized, engine="vllm")
    assert formats_that_fit(renormalized, "vllm") == ["mixtral", "qwen2_moe"]
    with pytest.raises(ValueError, match="Unknown engine 'tgi'"):
        get_exporter("mixtral", renormalized, engine="tgi")


def test_cli_refuses_before_writing_and_prints_the_engines(tmp_path, capsys):
    _, src = _saved_moe(tmp_path, shared_expert_intermediate_size=48)
    out = tmp_path / "qwen"
    assert main(["export", str(src), str(out), "--format", "qwen2_moe", "--engine", "llama.cpp"]) == 2
    assert "llama.cpp cannot compute" in capsys.readouterr().err and not out.exists()
    assert not list(tmp_path.glob(".qwen*"))  # no temporary folder left either
    assert main(["export", str(src), str(out), "--format", "qwen2_moe", "--engine", "vllm"]) == 0
    printed = capsys.readouterr().out
    assert "vLLM" in printed and "exact" in printed and "never renormalizes" in printed
    card = (out / "README.md").read_text()  # the exported model's card carries the same table
    assert "| vLLM | yes |" in card and "| llama.cpp | no | its qwen2moe never renormalizes" in card
    assert main(["export", str(src), str(tmp_path / "mixtral"), "--format", "mixtral"]) == 2  # shared expert
    _, plain = _saved_moe(tmp_path / "plain")
    assert main(["export", str(plain), str(tmp_path / "mixtral"), "--format", "mixtral"]) == 0
    card = (tmp_path / "mixtral" / "README.md").read_text()
    assert "-ctk f32 -ctv f32" in card and "vLLM --dtype float32" in card  # precision advice
    assert "vLLM --dtype float32" in capsys.readouterr().out
