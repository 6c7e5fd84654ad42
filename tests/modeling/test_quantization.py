"""bitsandbytes 8-bit and 4-bit loading on CPU: attention/dense Linear layers quantized, router, experts
and lm_head kept in full precision, and the model still generates."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import tiny_moe_config

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_load_and_generate(tmp_path, bits):
    # bitsandbytes 0.50's CPU 4-bit kernels failed at hidden size 32, so >= 64; dense layer 1 gets quantized too.
    model = LlamaMoEForCausalLM(tiny_moe_config(hidden_size=128, intermediate_size=256, moe_layers=[0])).eval()
    model.save_pretrained(tmp_path)
    options = {"llm_int8_skip_modules": ["lm_head", "gate"]}
    if bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True, **options)
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **options)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    linear_class = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, linear_class)
    assert isinstance(quantized.model.layers[1].mlp.up_proj, linear_class)
    assert not isinstance(quantized.lm_head, linear_class)
    assert quantized.model.layers[0].mlp.gate.weight.dtype == torch.float32
    prompt = torch.tensor([[5, 6, 7, 8]])
    out = quantized.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    with torch.no_grad():
        reference = model(prompt).logits
        logits = quantized(prompt).logits
    assert torch.isfinite(logits).all()
    # Quantization error is bounded: logits stay close to the full-precision model's.
    relative_error = ((logits - reference).norm() / reference.norm()).item()
    print(f"{bits}-bit relative logit error {relative_error:.3f}")
    assert relative_error < (0.05 if bits == 8 else 0.4)
