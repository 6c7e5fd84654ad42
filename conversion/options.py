"""Upcycling options: one dataclass shared by the CLI, `upcycle()` and `from_dense()`, with its checks.

Checks here need only the dense config (no weights), so every user mistake is reported before any tensor is
read or any file written. Must not read weights or import method modules (methods add their own checks).
"""

from dataclasses import dataclass, fields

import torch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROUTER_INITS = ("normal", "zeros", "centroids")


@dataclass
class UpcycleOptions:
    method: str = "copy"
    num_experts: int = 8
    top_k: int = 2
    moe_layers: str | list[int] = "all"
    shared_experts: int = 0
    norm_topk_prob: bool | None = None  # None: the method's default (True everywhere but granular's paper mode)
    routed_scaling_factor: float | None = None  # None: the method's default
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    router_init: str = "normal"
    router_std: float | None = None  # None: the dense config's initializer_range
    expert_noise: float = 0.0
    drop_ratio: float = 0.5
    granularity: int = 1
    granular_scaling: str = "paper"
    cluster_on: str = "up"
    calibration_data: str | None = None
    expert_size: int | None = None
    calibration_tokens: int = 4096
    dtype: str = "auto"
    seed: int = 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "UpcycleOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown upcycling option(s) {unknown}; valid options: {sorted(known)}.")
        return cls(**kwargs)


def resolve_moe_layers(spec, num_layers: int) -> list[int]:
    """'all', 'every-other' (1, 3, 5, ... as in GShard/Switch), a comma list '0,2,5' or a list of ints."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(num_layers))
        if text in ("every-other", "every_other"):
            return list(range(1, num_layers, 2))
        try:
            layers = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"--moe-layers {spec!r} is not understood: use 'all', 'every-other' or a comma list such as 0,2,5."
            ) from None
    else:
        layers = [int(i) for i in spec]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(
            f"--moe-layers {spec!r} names layers {bad or 'none'} but the model has {num_layers} layers "
            f"(valid: 0..{num_layers - 1})."
        )
    return sorted(set(layers))


def check_common(options: UpcycleOptions, dense_config) -> None:
    """Checks that hold for every method."""
    E, k = options.num_experts, options.top_k
    if E < 1:
        raise ValueError(f"--num-experts must be >= 1, got {E}.")
    if not 1 <= k <= E:
        raise ValueError(f"--top-k {k} does not fit {E} experts: pick 1 <= top-k <= num-experts.")
    if options.shared_experts < 0:
        raise ValueError(f"--shared-experts must be >= 0, got {options.shared_experts}.")
    if options.capacity_factor is not None and options.capacity_factor <= 0:
        raise ValueError(f"--capacity-factor must be > 0 (or left out for dropless), got {options.capacity_factor}.")
    if options.routed_scaling_factor is not None and options.routed_scaling_factor <= 0:
        raise ValueError(f"--routed-scaling-factor must be > 0, got {options.routed_scaling_factor}.")
    if options.aux_loss_coef < 0:
        raise ValueError(f"--aux-loss-coef must be >= 0, got {options.aux_loss_coef}.")
    if options.router_init not in ROUTER_INITS:
        raise ValueError(f"--router-init {options.router_init!r} is unknown; choose one of {list(ROUTER_INITS)}.")
    if options.router_init == "centroids" and options.method not in ("clustering", "gradient"):
        raise ValueError(
            "--router-init centroids needs --method clustering or gradient (the centroids come from clustering)."
        )
    if options.expert_noise < 0:
        raise ValueError(f"--expert-noise must be >= 0, got {options.expert_noise}.")
    if options.dtype != "auto" and options.dtype not in DTYPES:
        raise ValueError(f"--dtype {options.dtype!r} is unknown; choose auto or one of {list(DTYPES)}.")
    resolve_moe_layers(options.moe_layers, dense_config.num_hidden_layers)
