"""Upcycling options: one dataclass shared by the CLI, `upcycle()` and `upcycle_in_memory()`, with its checks.

The common fields (experts, top-k, routing, dtype, seed) are written here; each construction method adds its own
knobs through its `options` dataclass (conversion/methods/), and `UpcycleOptions` is built from both, so a new
method's options need no edit here. The checks here need no model at all (those that need the dense config are
the methods' own), so option mistakes are reported before the base is opened. Must not read weights.
"""

from dataclasses import dataclass, field, fields, make_dataclass

import torch

from .calibration import SEQUENCE_LENGTH, parse_calibration_sources
from .methods import METHODS, flag

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROUTER_INIT_HELP = {
    "normal": "seeded normal rows of std --router-std",
    "zeros": "all zero: every expert tied until training separates them",
    "centroids": "the centroids of the clustering that made the experts",
    "fit": "fitted on calibration text: each row predicts its expert's output norm from the layer's input",
}
ROUTER_INITS = tuple(ROUTER_INIT_HELP)


def _or_list(names: list[str]) -> str:
    return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]


@dataclass
class CommonOptions:
    method: str = "copy"
    num_experts: int = 8
    top_k: int = 2
    moe_layers: str | list[int] = "all"
    shared_experts: int = 0
    norm_topk_prob: bool | None = None  # None: the method's default (True everywhere but granular's paper mode)
    routed_scaling_factor: float | None = None  # None: the method's default
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    router_init: str | None = None  # None: the method's default (the first of its router_inits)
    router_std: float | None = None  # None: the dense config's initializer_range
    calibration_data: str | list[str] | None = None  # sources (calibration.py); None: the default mixture
    calibration_tokens: int | None = None  # None: the method's default_calibration_tokens
    dtype: str = "auto"
    seed: int = 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "UpcycleOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown upcycling option(s) {unknown}; valid options: {sorted(known)}.")
        options = cls(**kwargs)
        method = METHODS.get(options.method)
        if method is not None:
            foreign = [
                name
                for name in kwargs
                if name in METHOD_OPTION_OWNERS
                and name not in method.option_names()
                and kwargs[name] != METHOD_OPTION_FIELDS[name].default
            ]
            if foreign:
                name = foreign[0]
                raise ValueError(
                    f"{flag(name)} is an option of --method {' or '.join(METHOD_OPTION_OWNERS[name])}; "
                    f"{options.method!r} does not use it."
                )
        return options


def _method_option_fields() -> tuple[dict, dict]:
    """Every method's option fields by name (a name several methods share must mean the same thing) and the
    methods that own each."""
    found, owners = {}, {}
    for method in METHODS.values():
        for f in fields(method.options):
            if f.name in found and (found[f.name].default, found[f.name].metadata["type"]) != (
                f.default,
                f.metadata["type"],
            ):
                raise TypeError(f"method option {f.name!r} is declared twice with different defaults or types.")
            found.setdefault(f.name, f)
            owners.setdefault(f.name, []).append(method.name)
    return found, owners


METHOD_OPTION_FIELDS, METHOD_OPTION_OWNERS = _method_option_fields()
UpcycleOptions = make_dataclass(
    "UpcycleOptions",
    [(name, f.type, field(default=f.default, metadata=f.metadata)) for name, f in METHOD_OPTION_FIELDS.items()],
    bases=(CommonOptions,),
)
UpcycleOptions.__module__ = __name__
UpcycleOptions.__doc__ = "Common upcycling options plus every method's own (see each method's `options`)."


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


def check_calibration(options: UpcycleOptions, method) -> None:
    layerwise = method.calibrated or options.router_init == "fit"
    if not (layerwise or method.reads_calibration_text):
        if options.calibration_data is not None:
            raise ValueError(
                f"--calibration-data is read by calibrated methods and --router-init fit; --method {method.name} "
                f"with --router-init {options.router_init} does not use it."
            )
        return
    parse_calibration_sources(options.calibration_data)  # names and files, before the base is opened
    if layerwise and options.calibration_tokens is not None and options.calibration_tokens < SEQUENCE_LENGTH:
        raise ValueError(f"--calibration-tokens must be >= {SEQUENCE_LENGTH}, got {options.calibration_tokens}.")


def check_common(options: UpcycleOptions) -> None:
    """Checks that hold for every method and need no model (run before the base model is opened: a .gguf file is
    dequantized when it is opened)."""
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
    method = METHODS.get(options.method)
    if method is not None and options.router_init not in method.router_inits:
        able = [name for name, m in METHODS.items() if options.router_init in m.router_inits]
        raise ValueError(
            f"--router-init {options.router_init} needs --method {_or_list(able)} "
            f"({ROUTER_INIT_HELP[options.router_init]}); {options.method!r} supports {list(method.router_inits)}."
        )
    if method is not None:
        method.check_choices(options)
        check_calibration(options, method)
    if options.dtype != "auto" and options.dtype not in DTYPES:
        raise ValueError(f"--dtype {options.dtype!r} is unknown; choose auto or one of {list(DTYPES)}.")
    if method is not None and options.shared_experts and not method.supports_shared_experts:
        splitters = ", ".join(name for name, m in METHODS.items() if m.supports_shared_experts)
        raise ValueError(
            f"--shared-experts needs a method that splits the FFN ({splitters}); {method.name!r} does not."
        )
