"""The one rule for counting an MoE model's parameters, from tensor names and shapes, and the three ways to apply
it: to names and shapes (`shape_parameter_counts`, e.g. from safetensors headers), to a model
(`model_parameter_counts`), to a config (`config_parameter_counts`, through a model on the meta device).

Not part of the remote-code bundle (nothing in the model uses it); like the bundle, it imports only torch and its
siblings.
"""

import math
import re
from collections.abc import Iterable, Sequence

import torch

from .modeling_llama_moe import LlamaMoEForCausalLM

# Routed experts: fused tensors under `.experts.` whose first dimension is the expert count (transformers v5), or
# per-expert tensors `.experts.N.` (Mixtral's and Qwen2-MoE's checkpoint names). A `shared_expert` is not routed.
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def is_routed_expert(name: str, shape: Sequence[int], num_experts: int | None) -> bool:
    if not num_experts:
        return False
    name = f".{name}"
    return bool(_PER_EXPERT.search(name)) or (".experts." in name and len(shape) == 3 and shape[0] == num_experts)


def shape_parameter_counts(
    named_shapes: Iterable[tuple[str, Sequence[int]]], num_experts: int | None, top_k: int | None
) -> dict:
    """total: every parameter once (list a tied matrix once); routed_experts: the routed experts' share;
    active: what one token goes through, total - routed + routed * top_k / num_experts (the embedding lookup
    included, as model cards count it; a dense model has active == total)."""
    total = routed = 0
    for name, shape in named_shapes:
        count = math.prod(shape)
        total += count
        if is_routed_expert(name, shape, num_experts):
            routed += count
    active = total - routed + (routed * top_k // num_experts if routed and top_k else 0)
    return {"total": total, "active": active, "routed_experts": routed}


def model_parameter_counts(model) -> dict:
    """`shape_parameter_counts` of a loaded (or meta) model, plus its embedding size; reads the expert count and top-k
    from the config (LlamaMoE, Mixtral, Qwen2-MoE, ... all name them num_experts / num_experts_per_tok)."""
    config = model.config
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # a tied matrix is listed once
    counts = shape_parameter_counts(shapes, num_experts, top_k)
    embedding = model.get_input_embeddings()
    counts.update(
        embedding=embedding.weight.numel() if embedding is not None else 0, num_experts=num_experts, top_k=top_k
    )
    return counts


def config_parameter_counts(config) -> dict:
    """`model_parameter_counts` of the LlamaMoE model a config describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = LlamaMoEForCausalLM(config)
    return model_parameter_counts(model)
