"""The contract every construction method follows: one dense FFN in, routed experts (+ router, shared expert) out.

A method sees one layer's dense SwiGLU weights in float32, the options and a seeded generator; it must not read
files, know about checkpoints or shards, or touch other layers (streaming depends on that).
"""

import builtins
from dataclasses import dataclass, field, fields

import torch


@dataclass
class DenseFFN:
    """One Llama MLP in float32: gate [I, H], up [I, H], down [H, I]; `inputs` [T, H] are its inputs on the
    calibration tokens when the method is `calibrated` or the router is fitted (else None)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    inputs: torch.Tensor | None = None

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[0]

    def select(self, neurons: torch.Tensor) -> "DenseFFN":
        return DenseFFN(self.gate[neurons], self.up[neurons], self.down[:, neurons])

    def activations(self, x_TH: torch.Tensor) -> torch.Tensor:
        """[T, I] SwiGLU activations silu(gate x) * (up x), Llama's MLP before its down projection."""
        return torch.nn.functional.silu(x_TH @ self.gate.T) * (x_TH @ self.up.T)

    def output(self, x_TH: torch.Tensor) -> torch.Tensor:
        """[T, H] what the dense FFN returns for x."""
        return self.activations(x_TH) @ self.down.T


@dataclass
class ExpertInit:
    """What a method builds for one MoE layer.

    gate_up [E, 2I', H] (gate rows first, then up rows), down [E, H, I'];
    router [E, H] or None (None: the default init, normal with the router std, from the same generator);
    shared: the always-on shared expert, or None.
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    router: torch.Tensor | None = None
    shared: DenseFFN | None = None


def stack_experts(parts: list[DenseFFN]) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert FFNs -> the fused layout (gate_up [E, 2I', H], down [E, H, I'])."""
    gate_up = torch.stack([torch.cat([p.gate, p.up], dim=0) for p in parts])
    down = torch.stack([p.down for p in parts])
    return gate_up, down


def option(default, help: str, *, type=None, choices=None):
    """One knob of a method: a dataclass field whose help, type and choices become its `--flag` (the CLI, the
    model card and `upcycle(**options)` all read them from the method's `options` class)."""
    return field(default=default, metadata={"help": help, "type": type or builtins.type(default), "choices": choices})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class NoOptions:
    """A method without knobs of its own."""


class UpcycleMethod:
    """Base class. Subclasses set `name`, `summary`, their `options` dataclass (fields made with `option`) and
    override `build`; `check` and `config_changes` when the method needs more than copies of the full FFN."""

    name = ""
    summary = ""
    options = NoOptions
    supports_shared_experts = False
    # Router initializations this method can give (see options.ROUTER_INITS), the first is its default.
    router_inits = ("normal", "zeros")
    # Calibration: `calibrated` methods get each layer's FFN inputs on calibration text (DenseFFN.inputs);
    # `reads_calibration_text` ones run the whole model over it themselves (in `prepare`).
    calibrated = False
    reads_calibration_text = False
    default_calibration_tokens = 16384

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls.options)]

    def check_choices(self, options) -> None:
        """Each option declared with `choices` holds one of them; needs no model, so it runs before the base is
        opened (options.check_common)."""
        for spec in fields(self.options):
            choices, value = spec.metadata.get("choices"), getattr(options, spec.name)
            if choices and value not in choices:
                raise ValueError(f"{flag(spec.name)} {value!r} is unknown; choose one of {list(choices)}.")

    def fits_output_scale(self, options) -> bool:
        """Whether the routed experts' output is scaled to the dense FFN's on the calibration tokens
        (conversion/output_scale.py) after the router is made."""
        return False

    def check(self, dense_config, options) -> None:
        """Raise ValueError when the options do not fit this method or the model (before any work). Checks that
        need no model (`supports_shared_experts`, `check_choices`) run before it, in options.check_common."""

    def config_changes(self, dense_config, options) -> dict:
        """LlamaMoEConfig fields this method decides (expert width, scaling, ...), known before any weight."""
        return {"moe_intermediate_size": dense_config.intermediate_size}

    def prepare(self, source, options, moe_layers: list[int]):
        """Whole-model work done once before the layer loop (only the gradient method needs it); what it returns
        reaches `build` as `context`."""
        return None

    def build(self, ffn: DenseFFN, options, generator: torch.Generator, layer_idx: int, context=None) -> ExpertInit:
        """One MoE layer from one dense FFN. `context` is what `prepare` returned (None for most methods)."""
        raise NotImplementedError
