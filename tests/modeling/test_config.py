"""LlamaMoEConfig: Llama fields kept, MoE fields validated with clear ValueErrors, aliases and round trips."""

import pytest

from llama_moe.modeling import LlamaMoEConfig
from tests.conftest import LLAMA3_ROPE, tiny_moe_config


def test_defaults_and_alias():
    config = tiny_moe_config()
    assert config.model_type == "llama_moe"
    assert config.num_experts == config.num_local_experts == 4
    assert config.moe_layers == [0, 1]
    assert config.moe_intermediate_size == 32
    assert LlamaMoEConfig(intermediate_size=96, num_hidden_layers=2).moe_intermediate_size == 96
    config.num_experts = 6
    assert config.num_local_experts == 6


def test_llama_fields_round_trip(tmp_path):
    rope = dict(LLAMA3_ROPE)
    config = tiny_moe_config(
        rope_parameters=rope,
        tie_word_embeddings=True,
        attention_bias=True,
        moe_layers=[1],
        router_type="mlp",
        norm_topk_prob=False,
        routed_scaling_factor=4.0,
        capacity_factor=2.0,
        shared_expert_intermediate_size=16,
        shared_expert_gate=True,
        aux_loss_type="cv2",
    )
    config.save_pretrained(tmp_path)
    loaded = LlamaMoEConfig.from_pretrained(tmp_path)
    for name in (
        "rope_parameters",
        "tie_word_embeddings",
        "attention_bias",
        "moe_layers",
        "router_type",
        "norm_topk_prob",
        "routed_scaling_factor",
        "capacity_factor",
        "shared_expert_intermediate_size",
        "shared_expert_gate",
        "aux_loss_type",
        "num_key_value_heads",
    ):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok (5) is larger than num_local_experts (4)"),
        ({"moe_layers": [0, 7]}, "moe_layers has indices [7]"),
        ({"num_local_experts": 0}, "num_local_experts must be > 0"),
        ({"moe_intermediate_size": -1}, "moe_intermediate_size must be > 0"),
        ({"router_type": "transformer"}, "router_type='transformer' is unknown"),
        ({"router_noise": "gumbel"}, "router_noise='gumbel' is unknown"),
        ({"aux_loss_type": "zloss"}, "aux_loss_type='zloss' is unknown"),
        ({"capacity_factor": 0.0}, "capacity_factor must be > 0 or None"),
        ({"shared_expert_gate": True}, "needs a shared expert"),
        ({"routed_scaling_factor": 0}, "routed_scaling_factor must be > 0"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef must be >= 0"),
    ],
)
def test_invalid_values_raise_value_error(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_moe_config(**overrides)
    assert message in str(error.value)
