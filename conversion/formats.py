"""Output formats of an MoE checkpoint: our `llama_moe` layout, or `mixtral` / `qwen2_moe` that engines serve natively.

Each format is a small exporter class (fit check, target config, tensor renaming as a key table) in `EXPORTERS`;
`export_checkpoint` streams an existing llama_moe directory into another format, one tensor at a time. This module
must not hold a whole model in memory, import training/evaluation code, or write anything but safetensors.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import MixtralConfig, PreTrainedConfig, Qwen2MoeConfig
from transformers.dynamic_module_utils import custom_object_save

from llama_moe.modeling import LlamaMoEConfig, LlamaMoEForCausalLM

from .atomic import atomic_output_dir
from .engines import ENGINE_NAMES, engine_refusal, gguf_architecture
from .model_card import render_export_card
from .reader import CheckpointReader, copy_side_files, is_recomputed_buffer
from .writer import ShardedSafetensorsWriter, parse_size, read_written_shapes

DEFAULT_MAX_SHARD_SIZE = "5GB"


def write_config_and_code(config: PreTrainedConfig, out_dir: str | os.PathLike) -> None:
    """Write `config.json`; for our own config also the remote-code files and `auto_map`, exactly as
    `LlamaMoEForCausalLM.save_pretrained` does, without building the model's weights (meta device)."""
    if isinstance(config, LlamaMoEConfig):
        with torch.device("meta"):
            model = LlamaMoEForCausalLM(config)
        custom_object_save(model, out_dir, config=config)
    config.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# Key tables: template names -> template names. `{layer}` and `{expert}` are indices.
# ----------------------------------------------------------------------------------------------------------------

# Mixtral's legacy per-expert names: what vLLM, llama.cpp's convert_hf_to_gguf.py and the original
# mistralai/Mixtral-8x7B checkpoints use; transformers 5 reads them too (conversion_mapping.py "mixtral" merges
# `block_sparse_moe.experts.*.w1/w3` into `mlp.experts.gate_up_proj` and `w2` into `mlp.experts.down_proj`).
# A target holding `{expert}` receives one slice per expert (dim 0 of our fused tensor); several targets split
# each expert's slice into equal row blocks, in order (our gate_up_proj holds gate rows, then up rows).
MIXTRAL_KEY_MAP: dict[str, tuple[str, ...]] = {
    "model.layers.{layer}.mlp.gate.weight": ("model.layers.{layer}.block_sparse_moe.gate.weight",),
    "model.layers.{layer}.mlp.experts.gate_up_proj": (
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",  # gate [I, H]
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",  # up   [I, H]
    ),
    "model.layers.{layer}.mlp.experts.down_proj": (
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",  # down [H, I]
    ),
}
# Tensors that absorb `routed_scaling_factor` (Mixtral has none): the output is linear in down_proj.
MIXTRAL_SCALED_KEYS = ("model.layers.{layer}.mlp.experts.down_proj",)


# Qwen2-MoE (Qwen1.5-MoE) per-expert names, as vLLM, llama.cpp and transformers 5 ("qwen2_moe" conversion
# mapping) read them. Shared expert, its gate and dense layers' MLPs already carry Qwen2-MoE's names.
QWEN2_MOE_KEY_MAP: dict[str, tuple[str, ...]] = {
    "model.layers.{layer}.mlp.gate.weight": ("model.layers.{layer}.mlp.gate.weight",),
    "model.layers.{layer}.mlp.experts.gate_up_proj": (
        "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",  # [I, H]
        "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",  # [I, H]
    ),
    "model.layers.{layer}.mlp.experts.down_proj": ("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",),
}
QWEN2_MOE_SCALED_KEYS = ("model.layers.{layer}.mlp.experts.down_proj",)
# Qwen2-MoE's q/k/v projections have biases in every engine: ours get zero biases (exact).
QWEN2_MOE_ZERO_BIAS_KEYS = tuple(f"model.layers.{{layer}}.self_attn.{p}_proj.weight" for p in "qkv")
# Qwen2-MoE always gates the shared expert by sigmoid(x w). Without our gate, down_proj doubles and w is a constant
# so small that sigmoid(x w) rounds to exactly 1/2 (|x w| < 2^-26 while sum |x_j| < 2^22, far above any RMS-normed
# hidden state) yet is never 0: llama.cpp computes this sigmoid as silu(g) / g, NaN at g = 0. In float16 the
# constant underflows to 0 (exact for transformers and vLLM; engines.py says llama.cpp cannot serve it).
QWEN2_MOE_SHARED_DOWN_KEY = "model.layers.{layer}.mlp.shared_expert.down_proj.weight"
QWEN2_MOE_UNGATED_GATE_VALUE = 2.0**-48
# Qwen2-MoE always has a shared expert: a model without one gets a zero expert of this width (output exactly 0).
QWEN2_MOE_ROUTER_KEY = "model.layers.{layer}.mlp.gate.weight"
NULL_SHARED_EXPERT_SIZE = 1


@functools.cache
def template_regex(template: str) -> re.Pattern:
    """`model.layers.{layer}.x` -> a regex matching `model.layers.<digits>.x`, the index in group `layer`."""
    return re.compile("^" + re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)") + "$")


def apply_key_map(
    key_map: dict[str, tuple[str, ...]], name: str, tensor: torch.Tensor
) -> list[tuple[str, torch.Tensor]] | None:
    """Rename (and split) one tensor by a key table; None when no template matches `name`."""
    for source, targets in key_map.items():
        match = template_regex(source).match(name)
        if match is None:
            continue
        layer = match.group("layer")
        if "{expert}" not in targets[0]:
            return [(targets[0].format(layer=layer), tensor)]
        out = []
        for expert, expert_tensor in enumerate(tensor.unbind(0)):
            for target, block in zip(targets, expert_tensor.chunk(len(targets), dim=0)):
                out.append((target.format(layer=layer, expert=expert), block))
        return out
    return None


def _matches_any(templates, name: str) -> bool:
    return any(template_regex(t).match(name) for t in templates)


def fold_routed_scale(config: LlamaMoEConfig, tensor: torch.Tensor) -> torch.Tensor:
    """An expert down_proj (stacked or one expert's slice) with `routed_scaling_factor` folded in: the routed
    output is linear in it. torch computes a bf16/fp16 product in float32 and rounds once: the same bits as an
    explicit float32 round trip."""
    scale = float(config.routed_scaling_factor)
    return tensor * scale if scale != 1.0 else tensor


def fold_router_temperature(config: LlamaMoEConfig, tensor: torch.Tensor) -> torch.Tensor:
    """A linear router's weight with 1 / router_temperature folded in: logits / T = x (W / T)."""
    temperature = float(config.router_temperature)
    return tensor / temperature if temperature != 1.0 else tensor


def qwen2_moe_shared_expert_tensors(
    config: LlamaMoEConfig, name: str, tensor: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """Qwen2-MoE's shared-expert rules on one tensor of ours, in our names (Qwen2-MoE's for the shared expert):
    the tensor itself first, then what Qwen2-MoE needs beside it. A layer without a shared expert gets an all-zero
    one of width 1 next to its router (output exactly 0, and so are all its gradients, so it stays inert if
    trained further); an ungated shared expert gets its down_proj doubled and the tiny constant gate (sigmoid = 1/2
    exactly). Any other tensor comes back alone."""
    router = template_regex(QWEN2_MOE_ROUTER_KEY).match(name)
    if router and config.shared_expert_intermediate_size == 0:
        hidden, size, prefix = tensor.shape[1], NULL_SHARED_EXPERT_SIZE, f"model.layers.{router.group('layer')}.mlp"
        zeros = {"gate_proj": (size, hidden), "up_proj": (size, hidden), "down_proj": (hidden, size)}
        return [
            (name, tensor),
            *[(f"{prefix}.shared_expert.{proj}.weight", tensor.new_zeros(shape)) for proj, shape in zeros.items()],
            # the tiny constant gate, not 0: 0 * NaN would still be NaN in llama.cpp
            (f"{prefix}.shared_expert_gate.weight", tensor.new_full((1, hidden), QWEN2_MOE_UNGATED_GATE_VALUE)),
        ]
    if not config.shared_expert_gate and _matches_any((QWEN2_MOE_SHARED_DOWN_KEY,), name):
        gate_name = name.replace(".shared_expert.down_proj.weight", ".shared_expert_gate.weight")
        gate = tensor.new_full((1, tensor.shape[0]), QWEN2_MOE_UNGATED_GATE_VALUE)
        return [(name, tensor * 2), (gate_name, gate)]  # sigmoid(tiny) * 2 == 1, exactly
    return [(name, tensor)]


# ----------------------------------------------------------------------------------------------------------------
# Exporters
# ----------------------------------------------------------------------------------------------------------------


def shared_config_fields(c: LlamaMoEConfig) -> dict:
    """Config fields every exported architecture takes from ours unchanged: the Llama part and the MoE basics."""
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=float(c.initializer_range),
        rms_norm_eps=float(c.rms_norm_eps),
        use_cache=c.use_cache,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=c.attention_dropout,
        rope_parameters=dict(c.rope_parameters),
        num_experts_per_tok=c.num_experts_per_tok,
        output_router_logits=c.output_router_logits,
        router_aux_loss_coef=float(c.router_aux_loss_coef),
        dtype=c.dtype,
    )


class Exporter:
    """One output architecture. `supports` says whether a LlamaMoEConfig fits (appending reasons when it does
    not), `target_config` gives the config to write, `rename` maps one tensor of our layout to the target's."""

    name: ClassVar[str]
    description: ClassVar[str]
    remote_code: ClassVar[bool]  # True: the checkpoint needs our modeling files (auto_map + trust_remote_code).
    key_map: ClassVar[dict[str, tuple[str, ...]]] = {}  # our name template -> target name template(s)
    scaled_keys: ClassVar[tuple[str, ...]] = ()  # tensors that absorb routed_scaling_factor (linear in output)
    router_keys: ClassVar[tuple[str, ...]] = ()  # linear routers that absorb 1 / router_temperature

    def __init__(self, moe_config: LlamaMoEConfig):
        self.moe_config = moe_config

    @classmethod
    def supports(cls, config: LlamaMoEConfig, explain: list[str]) -> bool:
        return True

    def target_config(self, moe_config: LlamaMoEConfig) -> PreTrainedConfig:
        raise NotImplementedError

    def rename(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Target (name, tensor) pairs for one tensor of our layout, by `key_map`; other names go to
        `rename_unmapped`. Views are returned where possible: nothing bigger than one tensor is built."""
        renamed = apply_key_map(self.key_map, name, tensor)
        if renamed is None:
            return self.rename_unmapped(name, tensor)
        if _matches_any(self.scaled_keys, name):
            # Per expert slice, so a broadcast (expanded) source is never materialized whole.
            renamed = [(new_name, fold_routed_scale(self.moe_config, t)) for new_name, t in renamed]
        if _matches_any(self.router_keys, name):
            renamed = [(new_name, fold_router_temperature(self.moe_config, t)) for new_name, t in renamed]
        return renamed

    def rename_unmapped(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(name, tensor)]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the target checkpoint must hold, with its shape: our model's tensors (built on the meta
        device, so instant at any size) passed through `rename`. A tied `lm_head.weight` is left out."""
        with torch.device("meta"):
            model = LlamaMoEForCausalLM(self.moe_config)
        tied = set(model._tied_weights_keys or {}) if self.moe_config.tie_word_embeddings else set()
        shapes = {}
        for name, tensor in model.state_dict().items():
            if name in tied:
                continue
            for new_name, new_tensor in self.rename(name, tensor):
                shapes[new_name] = tuple(new_tensor.shape)
        return shapes


class LlamaMoEExporter(Exporter):
    name = "llama_moe"
    description = "our LlamaMoE model: every option; loads with trust_remote_code (or with llama-moe installed)"
    remote_code = True

    def target_config(self, moe_config: LlamaMoEConfig) -> PreTrainedConfig:
        return moe_config


class MixtralExporter(Exporter):
    name = "mixtral"
    description = "transformers' MixtralForCausalLM (no remote code), as vLLM and llama.cpp serve it"
    remote_code = False
    key_map = MIXTRAL_KEY_MAP
    scaled_keys = MIXTRAL_SCALED_KEYS
    router_keys = ("model.layers.{layer}.mlp.gate.weight",)

    @classmethod
    def supports(cls, config: LlamaMoEConfig, explain: list[str]) -> bool:
        reasons = []
        dense = [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]
        if dense:
            reasons.append(
                f"layers {dense} are dense but Mixtral has an MoE block in every layer (upcycle with --moe-layers all)"
            )
        if config.router_type != "linear":
            reasons.append(
                f"router_type={config.router_type!r}: Mixtral's router is a single linear layer (router_type 'linear')"
            )
        if not config.norm_topk_prob:
            reasons.append("norm_topk_prob=False: Mixtral always renormalizes the top-k probabilities")
        if config.shared_expert_intermediate_size:
            reasons.append(
                f"shared_expert_intermediate_size={config.shared_expert_intermediate_size}: Mixtral has no shared "
                "expert (use --format llama_moe, or upcycle without --shared-experts)"
            )
        if config.router_noise == "noisy_topk":
            reasons.append("router_noise='noisy_topk': Mixtral has no learned noisy gate")
        if config.capacity_factor is not None:
            reasons.append(f"capacity_factor={config.capacity_factor}: Mixtral is dropless (capacity_factor None)")
        if config.attention_bias:
            reasons.append("attention_bias=True: Mixtral's attention projections have no bias")
        explain.extend(reasons)
        return not reasons

    def target_config(self, moe_config: LlamaMoEConfig) -> PreTrainedConfig:
        c = moe_config
        return MixtralConfig(
            **shared_config_fields(c),
            intermediate_size=c.moe_intermediate_size,  # Mixtral's intermediate_size is one expert's width
            head_dim=c.head_dim,
            sliding_window=None,
            num_local_experts=c.num_local_experts,
            # Training-time only. Mixtral's jitter also scales the experts' input; ours only the router's.
            router_jitter_noise=float(c.router_jitter_noise) if c.router_noise == "jitter" else 0.0,
            architectures=["MixtralForCausalLM"],
        )

    def rename_unmapped(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if ".mlp." in name:
            raise ValueError(f"Tensor {name!r} has no place in a Mixtral checkpoint (not in MIXTRAL_KEY_MAP).")
        return [(name, tensor)]  # attention, norms, embeddings, lm_head: same names in Mixtral


class Qwen2MoeExporter(Exporter):
    name = "qwen2_moe"
    description = (
        "transformers' Qwen2MoeForCausalLM (no remote code): shared experts, dense layers and "
        "norm_topk_prob False allowed; served natively by vLLM, SGLang and llama.cpp"
    )
    remote_code = False
    key_map = QWEN2_MOE_KEY_MAP
    scaled_keys = QWEN2_MOE_SCALED_KEYS
    router_keys = (QWEN2_MOE_ROUTER_KEY,)

    @classmethod
    def supports(cls, config: LlamaMoEConfig, explain: list[str]) -> bool:
        reasons = []
        if config.router_type != "linear":
            reasons.append(
                f"router_type={config.router_type!r}: Qwen2-MoE's router is one linear layer (router_type 'linear')"
            )
        if config.router_noise == "noisy_topk":
            reasons.append("router_noise='noisy_topk': Qwen2-MoE has no learned noisy gate")
        if config.capacity_factor is not None:
            reasons.append(f"capacity_factor={config.capacity_factor}: Qwen2-MoE is dropless (capacity_factor None)")
        if config.attention_bias:
            reasons.append("attention_bias=True: Qwen2-MoE's o_proj has no bias")
        if config.mlp_bias and len(config.moe_layers) < config.num_hidden_layers:
            reasons.append("mlp_bias=True: Qwen2-MoE's dense MLPs have no bias")
        if config.head_dim != config.hidden_size // config.num_attention_heads:
            reasons.append(
                f"head_dim={config.head_dim}: Qwen2-MoE derives it as hidden_size // num_attention_heads "
                f"({config.hidden_size // config.num_attention_heads})"
            )
        explain.extend(reasons)
        return not reasons

    def target_config(self, moe_config: LlamaMoEConfig) -> PreTrainedConfig:
        c = moe_config
        # Untied: llama.cpp's qwen2moe requires its own output matrix (a tied embedding is written twice).
        return Qwen2MoeConfig(
            **shared_config_fields(c) | {"tie_word_embeddings": False},
            intermediate_size=c.intermediate_size,  # dense (non-MoE) layers
            use_sliding_window=False,
            decoder_sparse_step=1,
            moe_intermediate_size=c.moe_intermediate_size,
            shared_expert_intermediate_size=c.shared_expert_intermediate_size or NULL_SHARED_EXPERT_SIZE,
            num_experts=c.num_local_experts,
            norm_topk_prob=c.norm_topk_prob,
            mlp_only_layers=[i for i in range(c.num_hidden_layers) if not c.is_moe_layer(i)],
            qkv_bias=True,
            architectures=["Qwen2MoeForCausalLM"],
        )

    def rename(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        (name, tensor), *added = qwen2_moe_shared_expert_tensors(self.moe_config, name, tensor)
        renamed = super().rename(name, tensor) + added
        if name == "model.embed_tokens.weight" and self.moe_config.tie_word_embeddings:
            renamed.append(("lm_head.weight", tensor))
        return renamed

    def rename_unmapped(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if _matches_any(QWEN2_MOE_ZERO_BIAS_KEYS, name):
            bias = torch.zeros(tensor.shape[0], dtype=tensor.dtype, device=tensor.device)
            return [(name, tensor), (name.removesuffix(".weight") + ".bias", bias)]
        return [(name, tensor)]  # attention, norms, embeddings, lm_head, shared expert, dense MLPs


EXPORTERS: dict[str, type[Exporter]] = {cls.name: cls for cls in (LlamaMoEExporter, MixtralExporter, Qwen2MoeExporter)}


FORMATS = [*EXPORTERS, "gguf"]  # every --format value


def formats_that_fit(moe_config: LlamaMoEConfig, engine: str | None = None) -> list[str]:
    """Formats that can hold this configuration (gguf included, conversion/gguf_export.py); with `engine`, only
    those that engine computes exactly."""
    fit = [name for name, cls in EXPORTERS.items() if cls.supports(moe_config, [])]
    if gguf_architecture(moe_config, []) is not None:
        fit.append("gguf")
    return [name for name in fit if engine is None or engine_refusal(name, moe_config, engine) is None]


def get_exporter(name: str, moe_config: LlamaMoEConfig, engine: str | None = None) -> Exporter:
    """The exporter for format `name`, or ValueError naming every reason the configuration does not fit; with
    `engine` (engines.ENGINES), also refused when that engine would not compute the export exactly as we do."""
    if name == "gguf":
        raise ValueError("The gguf format is one file written by conversion.gguf_export.export_gguf, not an Exporter.")
    if name not in EXPORTERS:
        raise ValueError(f"Unknown format {name!r}: choose one of {FORMATS}.")
    cls = EXPORTERS[name]
    reasons: list[str] = []
    if not cls.supports(moe_config, reasons):
        lines = "\n".join(f"  - {reason}" for reason in reasons)
        raise ValueError(
            f"This configuration does not fit format {name!r}:\n{lines}\n"
            f"Formats that fit it: {formats_that_fit(moe_config)} (all formats: {FORMATS})."
        )
    if engine is not None:
        refusal = engine_refusal(name, moe_config, engine)
        if refusal:
            raise ValueError(
                f"{refusal} Formats that {ENGINE_NAMES[engine]} serves for this configuration: "
                f"{formats_that_fit(moe_config, engine)}."
            )
    return cls(moe_config)


def check_written_tensors(written: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming missing, unexpected and mis-shaped tensors of a converted checkpoint."""
    problems = []
    missing = sorted(set(expected) - set(written))
    extra = sorted(set(written) - set(expected))
    wrong = sorted(n for n in set(expected) & set(written) if tuple(expected[n]) != tuple(written[n]))
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors, e.g. {extra[:5]}")
    if wrong:
        problems.append("wrong shapes: " + ", ".join(f"{n} {written[n]} (expected {expected[n]})" for n in wrong[:5]))
    if problems:
        raise ValueError("The converted checkpoint does not match its config: " + "; ".join(problems) + ".")


class PlannedTensor(NamedTuple):
    """One tensor of our layout, known by shape and dtype before `load()` produces it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


class ConversionResult(NamedTuple):
    path: str
    num_tensors: int
    bytes_written: int
    num_shards: int


def _write_renamed(writer: ShardedSafetensorsWriter, exporter: Exporter, name: str, tensor: torch.Tensor) -> None:
    # A function of its own so that the renamed views are freed before the next tensor loads.
    for new_name, new_tensor in exporter.rename(name, tensor):
        writer.write(new_name, new_tensor)


def write_checkpoint(
    planned: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    stream: Iterable[tuple[str, torch.Tensor]],
    exporter: Exporter,
    out_dir: str | os.PathLike,
    *,
    finish: Callable[[str], None],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> ConversionResult:
    """The one write pipeline (upcycle, export, LLaMA-MoE v1 import). From the planned (name, shape, dtype) of our
    layout, the target names and shapes are derived through `exporter` and checked before anything is written;
    then `stream` yields our tensors one at a time, each renamed and appended to its shard; the written headers are
    checked again, the target config (with remote code for llama_moe) is written and `finish(folder)` adds the
    rest (tokenizer, side files, model card). The folder appears under its name only when all of it succeeded."""
    specs = []
    for name, shape, dtype in planned:
        for new_name, meta in exporter.rename(name, torch.empty(shape, dtype=dtype, device="meta")):
            specs.append((new_name, tuple(meta.shape), dtype))
    expected = exporter.expected_shapes()
    check_written_tensors({name: shape for name, shape, _ in specs}, expected)
    shard_bytes = parse_size(max_shard_size)
    with atomic_output_dir(os.fspath(out_dir), overwrite=overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, shard_bytes)
        try:
            for name, tensor in stream:
                _write_renamed(writer, exporter, name, tensor)
                del tensor  # before the stream produces the next one: one source tensor in memory at a time
        finally:
            writer.abort()
        writer.close()
        check_written_tensors(read_written_shapes(tmp), expected)
        write_config_and_code(exporter.target_config(exporter.moe_config), tmp)
        finish(tmp)
    return ConversionResult(os.fspath(out_dir), len(specs), writer.bytes_written, len(writer.file_names))


def write_converted_checkpoint(
    tensors: list[PlannedTensor],
    exporter: Exporter,
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    desc: str = "Converting",
    card: str | None = None,
) -> ConversionResult:
    """`write_checkpoint` for tensors read from another checkpoint folder (export, v1 import): each loaded when
    its turn comes, the source's tokenizer and generation-config files copied beside, and `card` (if given)
    written as README.md."""
    stream = ((item.name, item.load()) for item in tqdm(tensors, desc=desc, unit="tensor"))

    def finish(folder: str) -> None:
        copy_side_files(src_dir, folder)
        if card is not None:
            Path(folder, "README.md").write_text(card)

    return write_checkpoint(
        [(item.name, item.shape, item.dtype) for item in tensors],
        stream,
        exporter,
        out_dir,
        finish=finish,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )


def export_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    format_name: str,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    verbose: bool = True,
    engine: str | None = None,
) -> str:
    """Convert a llama_moe checkpoint directory into `format_name`, streaming tensor by tensor.

    Writes atomically (a temporary directory beside `out_dir`, renamed at the end), copies tokenizer and
    generation-config files, and checks the written tensors' names and shapes. With `engine`, refuses (before
    writing) an export that engine would not compute exactly as we do. Returns the output path.
    """
    src = Path(src_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} not found: {str(src)!r} is not a Hugging Face model directory.")
    raw = json.loads(config_path.read_text())
    if raw.get("model_type") != LlamaMoEConfig.model_type or "num_local_experts" not in raw:
        raise ValueError(
            f"{str(src)!r} is not a llama_moe checkpoint of this package (model_type {raw.get('model_type')!r}); "
            "LLaMA-MoE v1 checkpoints go through `import_llama_moe_v1`, dense models through `llama-moe upcycle`."
        )
    moe_config = LlamaMoEConfig.from_pretrained(src)
    exporter = get_exporter(format_name, moe_config, engine)
    reader = CheckpointReader(src)
    tensors = [
        PlannedTensor(name, *reader.shape_and_dtype(name), functools.partial(reader.get, name))
        for name in reader.keys()
        if not is_recomputed_buffer(name)
        and not (name == "lm_head.weight" and moe_config.tie_word_embeddings)  # tied: the embedding is the head
    ]
    result = write_converted_checkpoint(
        tensors,
        exporter,
        src,
        out_dir,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        desc=f"Exporting to {format_name}",
        card=render_export_card(os.fspath(src_dir), format_name, moe_config),
    )
    if verbose:
        tqdm.write(
            f"Wrote {format_name} checkpoint {result.path!r}: {result.num_tensors} tensors, "
            f"{result.bytes_written / 1e9:.2f} GB in {result.num_shards} shard(s)."
        )
    return result.path


__all__ = [
    "EXPORTERS",
    "FORMATS",
    "Exporter",
    "LlamaMoEExporter",
    "MixtralExporter",
    "Qwen2MoeExporter",
    "MIXTRAL_KEY_MAP",
    "QWEN2_MOE_KEY_MAP",
    "get_exporter",
    "formats_that_fit",
    "export_checkpoint",
    "apply_key_map",
    "check_written_tensors",
    "PlannedTensor",
    "ConversionResult",
    "write_config_and_code",
    "write_converted_checkpoint",
]
