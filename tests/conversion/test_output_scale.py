"""The routed output scale (conversion/output_scale.py): the least-squares factor between the MoE block's routed
output and what the dense FFN leaves after the shared expert, exactly 1 when every expert is chosen."""

import torch

from llama_moe.conversion.methods.base import DenseFFN
from llama_moe.conversion.methods.random import experts_from_groups
from llama_moe.conversion.output_scale import routed_output_scale
from llama_moe.conversion.pipeline import moe_block
from llama_moe.modeling import LlamaMoEConfig

H, I, E = 16, 48, 4


def block_and_ffn(top_k: int, shared: bool):
    torch.manual_seed(0)
    ffn = DenseFFN(torch.randn(I, H) * 0.3, torch.randn(I, H) * 0.3, torch.randn(H, I) * 0.3, torch.randn(256, H))
    width = I // (E + 1) if shared else I // E
    neurons = torch.randperm(I)
    init = experts_from_groups(ffn, neurons[: E * width].reshape(E, width), neurons[E * width :][None])
    config = LlamaMoEConfig(
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_local_experts=E,
        num_experts_per_tok=top_k,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=I - E * width if shared else 0,
        routed_scaling_factor=float(top_k),
    )
    router = torch.zeros(E, H) if top_k == E else torch.randn(E, H)  # zeros: equal weights 1/k, times k = 1
    tensors = [
        ("model.layers.0.mlp.gate.weight", router),
        ("model.layers.0.mlp.experts.gate_up_proj", init.gate_up),
        ("model.layers.0.mlp.experts.down_proj", init.down),
    ]
    if shared:
        tensors += [
            (f"model.layers.0.mlp.shared_expert.{p}_proj.weight", getattr(init.shared, p))
            for p in ("gate", "up", "down")
        ]
    return moe_block(config, tensors), ffn


def output_error(block, ffn, scale: float) -> float:
    with torch.no_grad():
        shared = block.shared_output(ffn.inputs)
        routed = block(ffn.inputs) - shared
        return float((ffn.output(ffn.inputs) - shared - scale * routed).pow(2).sum())


def test_scale_minimizes_the_layer_error_on_calibration_inputs():
    for shared in (False, True):
        block, ffn = block_and_ffn(top_k=2, shared=shared)
        scale = routed_output_scale(block, ffn)
        best = output_error(block, ffn, scale)
        assert scale != 1.0 and best < output_error(block, ffn, 1.0)
        assert best <= min(output_error(block, ffn, scale * 0.99), output_error(block, ffn, scale * 1.01))


def test_scale_is_one_when_every_expert_is_chosen():
    for shared in (False, True):
        block, ffn = block_and_ffn(top_k=E, shared=shared)
        assert abs(routed_output_scale(block, ffn) - 1.0) < 1e-5
