"""llama_moe.modeling: the LlamaMoE config and model, registered with transformers' Auto classes.

Importing this package registers `llama_moe` with AutoConfig / AutoModel / AutoModelForCausalLM in this process
(no trust_remote_code needed for your own checkpoints) and marks the classes for remote-code export, so
`save_pretrained` writes `auto_map` and copies the model files next to the weights.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_llama_moe import LlamaMoEConfig
from .dropless_moe import DroplessExpertsFunction, dropless_experts_forward, register_dropless_experts
from .modeling_llama_moe import (
    LlamaMoEExperts,
    LlamaMoEForCausalLM,
    LlamaMoEModel,
    LlamaMoEPreTrainedModel,
    LlamaMoESparseMoeBlock,
    LlamaMoETopKRouter,
)

AutoConfig.register(LlamaMoEConfig.model_type, LlamaMoEConfig, exist_ok=True)
AutoModel.register(LlamaMoEConfig, LlamaMoEModel, exist_ok=True)
AutoModelForCausalLM.register(LlamaMoEConfig, LlamaMoEForCausalLM, exist_ok=True)

LlamaMoEConfig.register_for_auto_class()
LlamaMoEModel.register_for_auto_class("AutoModel")
LlamaMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LlamaMoEConfig",
    "LlamaMoEModel",
    "LlamaMoEForCausalLM",
    "LlamaMoEPreTrainedModel",
    "LlamaMoESparseMoeBlock",
    "LlamaMoETopKRouter",
    "LlamaMoEExperts",
    "DroplessExpertsFunction",
    "dropless_experts_forward",
    "register_dropless_experts",
]
