"""`carve`: activation-aware, training-free construction (CMoE, ExpertWeaver): experts carved out of the dense FFN
by how its neurons fire on calibration text.

Per MoE layer, on the layer's inputs X [T, H] (layer-wise calibration, conversion/calibration.py):
- each neuron's contribution to token t is |act(g_j x_t) (u_j x_t)| * ||d_j||: how far it moves the output;
- the shared expert takes the neurons with the largest mean contribution (--shared-experts N: N expert widths,
  or --shared-expert-size neurons; plus the few neurons an expert width rounded to a multiple of 8 leaves over);
- the routed experts are a balanced k-means of the other neurons by co-activation (for which tokens a neuron is
  among the top 10% of contributions), one cluster per expert: every neuron sits in exactly one expert;
- the router is fitted on the same inputs (--router-init fit, this method's default; conversion/router_fit.py)
  and the routed scale is k, so each chosen expert counts fully, as it did inside the dense FFN.
Must not read checkpoints or run whole models: it sees one layer's weights and inputs.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import DenseFFN, ExpertInit, UpcycleMethod, option
from .clustering import balanced_kmeans
from .random import experts_from_groups

TOKEN_CHUNK = 4096
# A neuron is "active" for a token when among that token's top 10% of contributions (CMoE's choice). On SmolLM2 at
# 50% active without a shared expert, 10% gave 5.0x / 3.8x the dense perplexity, 25% 5.6x / 5.1x (with a shared
# expert both gave 2.9x / 2.4x); clustering the contributions themselves instead of these markers gave 9.2x / 4.7x.
ACTIVE_FRACTION = 0.1


OUTPUT_SCALES = ("k", "fit")


@dataclass
class CarveOptions:
    shared_expert_size: int | None = option(
        None, "width of the shared expert in neurons, instead of --shared-experts expert widths", type=int
    )
    output_scale: str = option(
        "k",
        "routed output scale: k (each chosen expert counts fully) or fit (least squares to the dense FFN's "
        "output on the calibration tokens; worse on SmolLM2, see conversion/output_scale.py)",
        choices=OUTPUT_SCALES,
    )
    width_multiple: int = option(
        8,
        "routed expert widths are multiples of this (8: grouped GEMMs; 256: llama.cpp's K-quants such as Q4_K_M "
        "keep every expert matrix in the asked type, with the FFN width a multiple of 256 too; 32: Q8_0)",
    )


def _round_down(width: int, multiple: int) -> int:
    """Rounded down to a multiple (8: row strides of 16 bytes for grouped GEMMs) when possible."""
    return width // multiple * multiple if width >= multiple else width


def carve_widths(intermediate: int, options) -> tuple[int, int]:
    """(routed expert width, shared expert width): every neuron in exactly one of them."""
    E, multiple = options.num_experts, options.width_multiple
    if options.shared_expert_size is None:
        width = _round_down(intermediate // (E + options.shared_experts), multiple)
    else:
        width = _round_down((intermediate - options.shared_expert_size) // E, multiple)
    return width, intermediate - E * width


def neuron_contributions(ffn: DenseFFN) -> torch.Tensor:
    """[T, I] |activation| x norm of the neuron's output column, on the calibration inputs."""
    column_norms_I = ffn.down.norm(dim=0)
    parts = []
    for x_TH in ffn.inputs.split(TOKEN_CHUNK):
        parts.append(ffn.activations(x_TH).abs() * column_norms_I)
    return torch.cat(parts)


def coactivation_features(contributions_TI: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """[len(neurons), T] unit vectors: for which tokens each neuron is among the most contributing."""
    top = max(1, round(ACTIVE_FRACTION * contributions_TI.shape[1]))
    threshold_T1 = contributions_TI.topk(top, dim=1).values[:, -1:]
    active_TN = (contributions_TI[:, neurons] >= threshold_T1).float()
    return F.normalize(active_TN.T, dim=1)


class CarveMethod(UpcycleMethod):
    name = "carve"
    summary = (
        "activation-aware: shared expert from the most active neurons, experts by co-activation, "
        "fitted router, on calibration text (CMoE)"
    )
    supports_shared_experts = True
    options = CarveOptions
    router_inits = ("fit", "normal", "zeros")
    calibrated = True

    def fits_output_scale(self, options) -> bool:
        return options.output_scale == "fit"

    def check(self, dense_config, options) -> None:
        super().check(dense_config, options)
        I, E = dense_config.intermediate_size, options.num_experts
        N, S = options.shared_experts, options.shared_expert_size
        if S is not None:
            if N:
                raise ValueError(
                    "give --shared-experts (in expert widths) or --shared-expert-size (neurons), not both."
                )
            if not 0 <= S < I:
                raise ValueError(f"--shared-expert-size {S} does not fit the FFN's {I} neurons: pick 0 <= size < {I}.")
        if options.width_multiple < 8 or options.width_multiple % 8:
            raise ValueError(f"--width-multiple {options.width_multiple}: use a multiple of 8 (8, 32, 256, ...).")
        width = carve_widths(I, options)[0]
        if options.width_multiple > 8 and (width % options.width_multiple or (I - E * width) % options.width_multiple):
            raise ValueError(
                f"--width-multiple {options.width_multiple}: the FFN's {I} neurons give {E} experts of {width} and "
                f"a shared expert of {I - E * width} neurons, not all multiples of it; lower --num-experts or "
                "--shared-experts, or the multiple."
            )
        if width < 1:
            shared = f"{N} shared expert widths" if S is None else f"a shared expert of {S} neurons"
            raise ValueError(
                f"--method carve cannot split the FFN's {I} neurons into {E} experts plus {shared}; "
                f"lower --num-experts or the shared size."
            )

    def config_changes(self, dense_config, options) -> dict:
        width, shared = carve_widths(dense_config.intermediate_size, options)
        return {
            "moe_intermediate_size": width,
            "shared_expert_intermediate_size": shared,
            "routed_scaling_factor": float(options.top_k),  # renormalized, nearly equal weights of 1/k each -> 1
        }

    def build(self, ffn: DenseFFN, options, generator: torch.Generator, layer_idx: int, context=None) -> ExpertInit:
        E = options.num_experts
        _, shared_width = carve_widths(ffn.intermediate_size, options)
        contributions_TI = neuron_contributions(ffn)
        # Shared by mean contribution: on SmolLM2 (4 shared + 4 of 12) 2.9x / 2.3x the dense perplexity, against
        # 3.5x / 2.7x when shared by how often a neuron is among the top 10% (CMoE's activation rate).
        by_mean = contributions_TI.mean(0).argsort(descending=True)
        shared, routed = by_mean[:shared_width].sort().values, by_mean[shared_width:].sort().values
        if E == 1:
            groups = routed[None]
        else:
            clusters, _ = balanced_kmeans(coactivation_features(contributions_TI, routed), E, generator)
            groups = routed[clusters]
        return experts_from_groups(ffn, groups, shared[None] if shared.numel() else shared)
