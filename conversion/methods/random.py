"""`random`: LLaMA-MoE's Independent-Random split of the FFN's intermediate neurons into equal groups.

Each expert (and, with --shared-experts N, the shared expert, N groups wide) gets a disjoint random set of
neurons: gate/up rows and down columns. Must keep every neuron exactly once.
"""

import torch

from .base import DenseFFN, ExpertInit, UpcycleMethod, stack_experts


def random_partition(num_neurons: int, num_groups: int, generator: torch.Generator) -> torch.Tensor:
    """[num_groups, num_neurons // num_groups] disjoint neuron indices (sorted within a group)."""
    perm = torch.randperm(num_neurons, generator=generator)
    return perm.view(num_groups, -1).sort(dim=1).values


class RandomMethod(UpcycleMethod):
    name = "random"
    summary = "split the FFN neurons into E equal random groups (LLaMA-MoE Independent-Random)"
    supports_shared_experts = True
    router_inits = (*UpcycleMethod.router_inits, "fit")

    def check(self, dense_config, options) -> None:
        super().check(dense_config, options)
        groups = options.num_experts + options.shared_experts
        if dense_config.intermediate_size % groups:
            raise ValueError(
                f"--method {self.name} splits the FFN ({dense_config.intermediate_size} neurons) into "
                f"{groups} equal parts (experts + shared experts), which does not divide it; pick a count that "
                f"divides {dense_config.intermediate_size}."
            )

    def config_changes(self, dense_config, options) -> dict:
        E, N = options.num_experts, options.shared_experts
        width = dense_config.intermediate_size // (E + N)
        return {
            "moe_intermediate_size": width,
            "shared_expert_intermediate_size": N * width,
            # LLaMA-MoE's rule: k of E experts carry k/E of the neurons; scale back by E/k.
            "routed_scaling_factor": E / options.top_k,
        }

    def build(self, ffn: DenseFFN, options, generator: torch.Generator, layer_idx: int, context=None) -> ExpertInit:
        E, N = options.num_experts, options.shared_experts
        groups = random_partition(ffn.intermediate_size, E + N, generator)
        return experts_from_groups(ffn, groups[N:], groups[:N])


def experts_from_groups(ffn: DenseFFN, expert_groups: torch.Tensor, shared_groups: torch.Tensor) -> ExpertInit:
    gate_up, down = stack_experts([ffn.select(g) for g in expert_groups])
    shared = ffn.select(shared_groups.reshape(-1).sort().values) if shared_groups.numel() else None
    return ExpertInit(gate_up=gate_up, down=down, shared=shared)
