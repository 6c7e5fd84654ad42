"""`drop`: Drop-Upcycling (Nakamura et al., ICLR 2025): copy, then re-initialize a fraction of each expert.

In every expert a different random subset of round(r * I) intermediate neurons (gate/up rows, down columns) is
redrawn from a normal with the mean and std of the original matrix it replaces. r = 0 is `copy`.
"""

from dataclasses import dataclass

import torch

from .base import DenseFFN, ExpertInit, UpcycleMethod, option


@dataclass
class DropOptions:
    drop_ratio: float = option(0.5, "fraction of each expert's neurons re-initialized (0 = copy)")


class DropMethod(UpcycleMethod):
    name = "drop"
    summary = "copy, then re-initialize a different random fraction --drop-ratio of neurons per expert (Drop-Upcycling)"
    options = DropOptions
    router_inits = (*UpcycleMethod.router_inits, "fit")

    def check(self, dense_config, options) -> None:
        super().check(dense_config, options)
        if not 0.0 <= options.drop_ratio <= 1.0:
            raise ValueError(f"--drop-ratio must be in [0, 1], got {options.drop_ratio}.")

    def build(self, ffn: DenseFFN, options, generator: torch.Generator, layer_idx: int, context=None) -> ExpertInit:
        E, I = options.num_experts, ffn.intermediate_size
        num_dropped = round(options.drop_ratio * I)
        gate = ffn.gate[None].repeat(E, 1, 1)
        up = ffn.up[None].repeat(E, 1, 1)
        down = ffn.down[None].repeat(E, 1, 1)
        weights = (("g", ffn.gate), ("u", ffn.up), ("d", ffn.down))
        stats = {name: (w.mean().item(), w.std().item()) for name, w in weights}
        for e in range(E):
            neurons = torch.randperm(I, generator=generator)[:num_dropped]
            if num_dropped == 0:
                continue
            gate[e, neurons] = normal_like(gate[e, neurons], *stats["g"], generator)
            up[e, neurons] = normal_like(up[e, neurons], *stats["u"], generator)
            down[e][:, neurons] = normal_like(down[e][:, neurons], *stats["d"], generator)
        return ExpertInit(gate_up=torch.cat([gate, up], dim=1), down=down)


def normal_like(t: torch.Tensor, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=generator, dtype=t.dtype) * std + mean
