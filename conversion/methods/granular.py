"""`granular`: NVIDIA's granular upcycling (He et al. 2024; Megatron-Core --moe-upcycling-granularity).

The FFN is cut into G shards (gate and up rows with the matching down columns), each replicated E/G times.
Expert e holds shard e % G and belongs to virtual group e // G, whose G experts share one router row, so top-k
(k a multiple of G) selects whole groups: k/G full copies of the FFN. Output scale: see GRANULAR_SCALING.
"""

from dataclasses import dataclass

import torch

from .base import DenseFFN, ExpertInit, UpcycleMethod, option, stack_experts

GRANULAR_SCALING = {
    "paper": "multiply gate, up and down by the cube root of the MoE/dense activation ratio (E*G/k for "
    "softmax-then-top-k, G for renormalized top-k), as Megatron-Core does: close to, not equal to, the dense "
    "output (SiLU is not linear)",
    "exact": "keep the weights, use renormalized top-k and routed_scaling_factor G: reproduces the dense output "
    "exactly at initialization",
}


@dataclass
class GranularOptions:
    granularity: int = option(1, "shards per FFN (G): expert width I/G, E/G copies of each shard")
    granular_scaling: str = option(
        "paper", "; ".join(f"{k} = {v}" for k, v in GRANULAR_SCALING.items()), choices=tuple(GRANULAR_SCALING)
    )


def activation_scale(options, norm_topk_prob: bool) -> float:
    """How much smaller the MoE output is than the dense one at init (Megatron-Core's moe_activation_scale)."""
    E, G, k = options.num_experts, options.granularity, options.top_k
    return float(G) if norm_topk_prob else E * G / k


class GranularMethod(UpcycleMethod):
    name = "granular"
    summary = "shard the FFN into G parts, replicate E/G times, virtual-group router, weight scaling (NVIDIA)"
    options = GranularOptions

    def check(self, dense_config, options) -> None:
        super().check(dense_config, options)
        E, G, k, I = options.num_experts, options.granularity, options.top_k, dense_config.intermediate_size
        if G < 1:
            raise ValueError(f"--granularity must be >= 1, got {G}.")
        if I % G:
            raise ValueError(f"--granularity {G} does not divide the FFN size {I}; pick a divisor of {I}.")
        if E % G:
            raise ValueError(f"--granularity {G} must divide --num-experts {E} (E/G copies of each shard).")
        if k % G:
            raise ValueError(
                f"--top-k {k} must be a multiple of --granularity {G}: a virtual group of G experts is picked as a "
                f"whole, so top-k selects k/G full copies of the FFN."
            )
        if options.router_init == "zeros" and G > 1:
            raise ValueError("--router-init zeros ties every expert, so top-k would split virtual groups; use normal.")
        if options.granular_scaling == "exact" and options.norm_topk_prob is False:
            raise ValueError(
                "--granular-scaling exact needs renormalized top-k (leave out --no-norm-topk-prob); the paper's "
                "softmax-then-top-k output depends on the router and cannot equal the dense output exactly."
            )

    def _norm_topk_prob(self, options) -> bool:
        if options.norm_topk_prob is not None:
            return options.norm_topk_prob
        # The paper prefers softmax-then-top-k; the exact mode needs renormalization.
        return options.granular_scaling == "exact"

    def config_changes(self, dense_config, options) -> dict:
        changes = {
            "moe_intermediate_size": dense_config.intermediate_size // options.granularity,
            "norm_topk_prob": self._norm_topk_prob(options),
        }
        if options.granular_scaling == "exact":
            changes["routed_scaling_factor"] = float(options.granularity)
        return changes

    def build(self, ffn: DenseFFN, options, generator: torch.Generator, layer_idx: int, context=None) -> ExpertInit:
        E, G = options.num_experts, options.granularity
        if options.granular_scaling == "paper":
            scale = activation_scale(options, self._norm_topk_prob(options)) ** (1 / 3)
            ffn = DenseFFN(ffn.gate * scale, ffn.up * scale, ffn.down * scale)
        shards = [ffn.select(idx) for idx in torch.arange(ffn.intermediate_size).view(G, -1)]
        gate_up, down = stack_experts([shards[e % G] for e in range(E)])
        std = options.router_std
        group_rows = torch.randn(E // G, ffn.gate.shape[1], generator=generator) * std
        return ExpertInit(gate_up=gate_up, down=down, router=group_rows.repeat_interleave(G, dim=0))
