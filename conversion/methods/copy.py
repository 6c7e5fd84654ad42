"""`copy`: every expert is the dense FFN (sparse upcycling; "Llama 3 Meets MoE").

With renormalized top-k the upcycled layer computes exactly the dense FFN. Must not materialize E copies
unless noise is asked for: without noise the experts are broadcast views, so streaming stays at one FFN.
"""

from dataclasses import dataclass

import torch

from .base import DenseFFN, ExpertInit, UpcycleMethod, option


@dataclass
class CopyOptions:
    expert_noise: float = option(0.0, "add N(0, (x*std(W))^2) to each expert's copy (breaks the symmetry)")


class CopyMethod(UpcycleMethod):
    name = "copy"
    summary = "every expert is a copy of the dense FFN (exact at init with renormalized top-k)"
    options = CopyOptions

    def check(self, dense_config, options) -> None:
        super().check(dense_config, options)
        if options.expert_noise < 0:
            raise ValueError(f"--expert-noise must be >= 0, got {options.expert_noise}.")

    def build(self, ffn: DenseFFN, options, generator: torch.Generator, layer_idx: int, context=None) -> ExpertInit:
        E = options.num_experts
        gate_up = torch.cat([ffn.gate, ffn.up], dim=0)[None].expand(E, -1, -1)
        down = ffn.down[None].expand(E, -1, -1)
        if options.expert_noise > 0:
            gate_up = add_relative_noise(gate_up, options.expert_noise, generator)
            down = add_relative_noise(down, options.expert_noise, generator)
        return ExpertInit(gate_up=gate_up, down=down)


def add_relative_noise(weight_E: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """weight + N(0, (scale * std(weight))^2), drawn independently per expert (breaks the copies' symmetry)."""
    std = weight_E[0].std().item()
    noise = torch.randn(weight_E.shape, generator=generator, dtype=weight_E.dtype) * (scale * std)
    return weight_E + noise
