"""llama.cpp quantization: which tensors of an export would be stored in a fallback type (rows not a multiple of
the type's block), said at upcycle/export time; and carve's --width-multiple choosing widths that quantize."""

from types import SimpleNamespace

import pytest

from llama_moe.conversion.engines import engine_lines, engine_table_markdown, quantization_fallbacks
from llama_moe.conversion.methods.carve import CarveMethod, carve_widths
from llama_moe.modeling import LlamaMoEConfig


def config(hidden, width, shared, heads=8):
    return LlamaMoEConfig(
        hidden_size=hidden,
        intermediate_size=16 * width,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        num_hidden_layers=2,
        num_local_experts=12,
        num_experts_per_tok=4,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=shared,
    )


def test_fallbacks_name_each_tensor_whose_rows_miss_the_block():
    quickstart = config(576, 96, 384, heads=9)  # SmolLM2 carved: hidden 576 is not a multiple of 256
    k_quants = quantization_fallbacks(quickstart, 256)
    assert any(line.startswith("ffn_down_exps (rows of 96 = moe_intermediate_size") for line in k_quants)
    assert any(line.startswith("ffn_gate_exps, ffn_up_exps (rows of 576 = hidden_size") for line in k_quants)
    assert quantization_fallbacks(quickstart, 32) == []  # Q8_0: 96, 384 and 576 are multiples of 32
    assert quantization_fallbacks(config(4096, 768, 5120, heads=32), 256) == []
    odd = quantization_fallbacks(config(4096, 896, 3584, heads=32), 256)
    assert [line.split(" (")[0] for line in odd] == ["ffn_down_exps"]  # 896 is not; the shared 3584 = 14 x 256 is


def test_cli_lines_and_cards_say_it():
    lines = engine_lines("gguf", config(4096, 896, 3584, heads=32))
    assert "ffn_down_exps (rows of 896" in lines and "--width-multiple 256" in lines
    assert "Q8_0, Q4_0, Q5_0 and the other legacy types: every matrix keeps the asked type" in lines
    assert "- llama.cpp K-quants" in engine_table_markdown("mixtral", config(4096, 768, 5120, heads=32))


def carve_options(**overrides):
    options = dict(num_experts=12, shared_experts=4, shared_expert_size=None, width_multiple=8, top_k=4)
    return SimpleNamespace(**{**options, **overrides})


def test_width_multiple_gives_widths_that_quantize_or_a_clear_error():
    assert carve_widths(14336, carve_options()) == (896, 3584)  # Llama-3-8B FFN, 4 shared + 4 of 12
    width, shared = carve_widths(14336, carve_options(width_multiple=256))
    assert (width, shared) == (768, 5120) and width % 256 == shared % 256 == 0
    dense = SimpleNamespace(intermediate_size=1536, hidden_size=576)
    with pytest.raises(ValueError, match="not all multiples of it"):
        CarveMethod().check(dense, carve_options(width_multiple=256))
    with pytest.raises(ValueError, match="use a multiple of 8"):
        CarveMethod().check(dense, carve_options(width_multiple=12))
