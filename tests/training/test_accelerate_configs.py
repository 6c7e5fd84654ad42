"""The shipped accelerate configs name classes that exist in our model, so FSDP wraps and ZeRO-3 leaves resolve.

A name that matches no module makes accelerate fail only at launch on the cluster (FSDP) or hang (ZeRO-3 without
its MoE leaf: ranks gather parameters in different orders); these checks catch a rename here.
"""

from pathlib import Path

import yaml

from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import tiny_moe_config

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "accelerate"


def _class_names():
    model = LlamaMoEForCausalLM(tiny_moe_config())
    return {type(module).__name__ for module in model.modules()}


def test_fsdp2_wraps_the_decoder_layer():
    config = yaml.safe_load((CONFIGS / "fsdp2.yaml").read_text())["fsdp_config"]
    assert config["fsdp_version"] == 2
    assert config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaMoEDecoderLayer"
    assert config["fsdp_transformer_layer_cls_to_wrap"] in _class_names()


def test_zero3_makes_the_moe_block_a_leaf():
    config = yaml.safe_load((CONFIGS / "deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    assert config["zero_stage"] == 3 and config["zero3_save_16bit_model"] is True
    leaves = config["deepspeed_moe_layer_cls_names"].split(",")
    assert leaves == ["LlamaMoESparseMoeBlock"] and set(leaves) <= _class_names()
