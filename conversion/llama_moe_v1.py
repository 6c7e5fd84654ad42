"""Import of released LLaMA-MoE v1 checkpoints (`llama-moe/LLaMA-MoE-v1-*`) into our llama_moe format.

Their remote code no longer runs on current transformers; this maps their config and weights (streamed, one
layer's experts at a time) onto LlamaMoEConfig with the same eval-mode outputs. It must not run their code,
unpickle anything beyond plain tensors, or load the whole model.
"""

from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llama_moe.modeling import LlamaMoEConfig

from .formats import (
    DEFAULT_MAX_SHARD_SIZE,
    PlannedTensor,
    get_exporter,
    template_regex,
    write_converted_checkpoint,
)
from .reader import CheckpointReader, is_recomputed_buffer

# v1 names -> ours. LLaMA-MoE's gate is `gate_network` = Linear(H, E) [-> Tanh -> Linear(E, E)] plus a noise
# projection; the rest of the model (attention, norms, embeddings, lm_head) keeps Llama's names.
V1_KEY_MAP: dict[str, str] = {
    "model.layers.{layer}.mlp.gate.gate_network.0.weight": "model.layers.{layer}.mlp.gate.weight",  # mlp router
    "model.layers.{layer}.mlp.gate.gate_network.2.weight": "model.layers.{layer}.mlp.gate.out_weight",  # mlp router
    "model.layers.{layer}.mlp.gate.gate_network.weight": "model.layers.{layer}.mlp.gate.weight",  # linear router
    "model.layers.{layer}.mlp.gate.weight_noise.weight": "model.layers.{layer}.mlp.gate.noise_weight",
}
# Per-expert v1 tensors, fused into ours: gate_up_proj[j] = [gate_j; up_j] ([2I, H]), down_proj[j] = down_j ([H, I]).
V1_EXPERT_KEYS: dict[str, str] = {
    "gate": "model.layers.{layer}.mlp.calculator.experts.weight_gate.{expert}",  # [size_j, H]
    "up": "model.layers.{layer}.mlp.calculator.experts.weight_up.{expert}",  # [size_j, H]
    "down": "model.layers.{layer}.mlp.calculator.experts.weight_down.{expert}",  # [H, size_j]
}
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.calculator\.experts\.weight_(gate|up|down)\.(\d+)$")

# The v1 options this importer reproduces, with the only values that have an equivalent in our model.
_V1_REQUIRED_VALUES = {
    "gate_type": ("TopKBalancedNoisyGate", "only the top-k noisy gate has an equivalent"),
    "calculator_type": ("UniversalCalculator", "the Switch drop-token calculator drops tokens at random"),
    "gate_use_softmax": (True, "raw top-k logits as weights have no equivalent (ours softmaxes them)"),
    "multiply_gate_scores": (True, "an unweighted sum of experts has no equivalent"),
    "add_weight_norm": (False, "the LayerNorm on weighted expert outputs has no equivalent"),
}


def is_llama_moe_v1_config(config: dict) -> bool:
    return "num_selects" in config and "num_local_experts" not in config


def llama_moe_v1_config(v1: dict) -> tuple[LlamaMoEConfig, list[float]]:
    """Our config for a v1 `config.json` dict, and the per-layer factors to fold into `down_proj` (all 1.0
    unless v1's `score_scale_factor` differs between layers). Raises ValueError listing every mismatch."""
    problems = []
    for field in ("num_experts", "num_selects", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if field not in v1:
            problems.append(f"`{field}` is missing")
    for field, (value, why) in _V1_REQUIRED_VALUES.items():
        if field in v1 and v1[field] != value:
            problems.append(f"{field}={v1[field]!r} is not supported ({why}); expected {value!r}")
    if v1.get("gate_network", "mlp") not in ("mlp", "linear"):
        problems.append(f"gate_network={v1['gate_network']!r} is unknown; LLaMA-MoE v1 has 'mlp' and 'linear'")
    if problems:
        raise ValueError("Cannot import this LLaMA-MoE v1 checkpoint:\n" + "\n".join(f"  - {p}" for p in problems))

    num_layers, num_experts = v1["num_hidden_layers"], v1["num_experts"]
    sizes = v1.get("size_experts")
    if sizes is None:
        if v1["intermediate_size"] % num_experts:
            raise ValueError(
                f"LLaMA-MoE v1 config: intermediate_size {v1['intermediate_size']} is not divisible by num_experts "
                f"{num_experts} and size_experts is not given."
            )
        sizes = [[v1["intermediate_size"] // num_experts] * num_experts for _ in range(num_layers)]
    if len(sizes) != num_layers or any(len(layer) != num_experts for layer in sizes):
        raise ValueError(
            f"LLaMA-MoE v1 config: size_experts must hold {num_layers} lists (one per layer) of {num_experts} sizes."
        )
    scale = v1.get("score_scale_factor", 1.0)
    scales = [float(s) for s in scale] if isinstance(scale, list) else [float(scale)] * num_layers
    if len(scales) != num_layers:
        raise ValueError(f"LLaMA-MoE v1 config: score_scale_factor has {len(scales)} entries for {num_layers} layers.")
    uniform = len(set(scales)) == 1
    # Our experts share one width: narrower v1 experts are padded with zero neurons (silu(0) * 0 = 0 exactly,
    # and their gradients are zero too, so they stay inert in training).
    moe_intermediate_size = max(max(layer) for layer in sizes)

    rope_parameters = {"rope_type": "default", "rope_theta": float(v1.get("rope_theta", 10000.0))}
    if v1.get("rope_scaling"):
        scaling = v1["rope_scaling"]
        rope_parameters.update(rope_type=scaling.get("type", scaling.get("rope_type")), factor=scaling["factor"])

    config = LlamaMoEConfig(
        vocab_size=v1.get("vocab_size", 32000),
        hidden_size=v1["hidden_size"],
        intermediate_size=v1["intermediate_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=v1.get("num_attention_heads", 32),
        num_key_value_heads=v1.get("num_key_value_heads") or v1.get("num_attention_heads", 32),
        hidden_act=v1.get("hidden_act", "silu"),
        max_position_embeddings=v1.get("max_position_embeddings", 2048),
        initializer_range=v1.get("initializer_range", 0.02),
        rms_norm_eps=v1.get("rms_norm_eps", 1e-6),
        use_cache=v1.get("use_cache", True),
        pad_token_id=v1.get("pad_token_id", 0),
        bos_token_id=v1.get("bos_token_id", 1),
        eos_token_id=v1.get("eos_token_id", 2),
        tie_word_embeddings=v1.get("tie_word_embeddings", False),
        rope_parameters=rope_parameters,
        num_local_experts=num_experts,
        num_experts_per_tok=v1["num_selects"],
        moe_intermediate_size=moe_intermediate_size,
        router_type=v1.get("gate_network", "mlp"),
        norm_topk_prob=True,  # softmax over the top-k logits == top-k of the softmax, renormalized
        routed_scaling_factor=scales[0] if uniform else 1.0,
        router_noise="noisy_topk" if v1.get("gate_add_noise", True) else "none",
        router_noise_epsilon=v1.get("gate_noise_epsilon", 1e-2),
        aux_loss_type="cv2",
        router_aux_loss_coef=v1.get("gate_balance_loss_weight", 1e-2) if v1.get("gate_use_balance", True) else 0.0,
        dtype=v1.get("torch_dtype", v1.get("dtype", "float32")),
    )
    fold = [1.0] * num_layers if uniform else scales
    return config, fold


def _expert_names(layer: int, expert: int) -> dict[str, str]:
    return {part: template.format(layer=layer, expert=expert) for part, template in V1_EXPERT_KEYS.items()}


def _fused_gate_up(reader: CheckpointReader, layer: int, num_experts: int, width: int) -> torch.Tensor:
    """Our gate_up_proj [E, 2I, H] from v1's per-expert gate and up [size_j, H]; rows past size_j stay zero."""
    fused = None
    for expert in range(num_experts):
        names = _expert_names(layer, expert)
        gate, up = reader.get(names["gate"]), reader.get(names["up"])
        if fused is None:
            fused = torch.zeros(num_experts, 2 * width, gate.shape[1], dtype=gate.dtype)
        fused[expert, : gate.shape[0]] = gate
        fused[expert, width : width + up.shape[0]] = up
    return fused


def _fused_down(reader: CheckpointReader, layer: int, num_experts: int, width: int, fold: float) -> torch.Tensor:
    """Our down_proj [E, H, I] from v1's per-expert down [H, size_j] times `fold`; columns past size_j stay 0."""
    fused = None
    for expert in range(num_experts):
        down = reader.get(_expert_names(layer, expert)["down"])
        if fused is None:
            fused = torch.zeros(num_experts, down.shape[0], width, dtype=down.dtype)
        fused[expert, :, : down.shape[1]] = down * fold if fold != 1.0 else down  # fold: float32 math, one rounding
    return fused


def plan_our_tensors(reader: CheckpointReader, config: LlamaMoEConfig, fold: list[float]) -> list[PlannedTensor]:
    """The checkpoint's tensors in our layout, in file order; each layer's experts are fused when loaded."""
    keep_noise = config.router_noise == "noisy_topk"
    E, width, H = config.num_local_experts, config.moe_intermediate_size, config.hidden_size
    planned, fused_layers = [], set()
    for name in reader.keys():
        if is_recomputed_buffer(name):  # v1 stored RoPE's inverse frequencies
            continue
        expert = _EXPERT_KEY.match(name)
        if expert:
            layer = int(expert.group(1))
            if layer in fused_layers:
                continue
            fused_layers.add(layer)
            missing = [n for j in range(E) for n in _expert_names(layer, j).values() if n not in reader]
            if missing:
                raise ValueError(f"LLaMA-MoE v1 checkpoint lacks {len(missing)} expert tensors, e.g. {missing[:3]}.")
            dtype = reader.shape_and_dtype(name)[1]
            prefix = f"model.layers.{layer}.mlp.experts"
            gate_up = partial(_fused_gate_up, reader, layer, E, width)
            down = partial(_fused_down, reader, layer, E, width, fold[layer])
            planned.append(PlannedTensor(f"{prefix}.gate_up_proj", (E, 2 * width, H), dtype, gate_up))
            planned.append(PlannedTensor(f"{prefix}.down_proj", (E, H, width), dtype, down))
            continue
        target = _v1_target_name(name)
        if target is None:
            if ".mlp." in name:
                raise ValueError(f"LLaMA-MoE v1 tensor {name!r} has no equivalent in our model.")
            target = name
        if target.endswith("noise_weight") and not keep_noise:
            continue  # v1 always stores the noise projection; it is unused when gate_add_noise is off
        planned.append(PlannedTensor(target, *reader.shape_and_dtype(name), partial(reader.get, name)))
    return planned


def import_llama_moe_v1(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format_name: str = "llama_moe",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    verbose: bool = True,
) -> str:
    """Convert a LLaMA-MoE v1 checkpoint directory into our format (or another of `EXPORTERS` that fits it)
    with the same eval-mode logits.

    Reads safetensors (or `pytorch_model*.bin` with `weights_only=True`), writes sharded safetensors, the config
    (with remote code for llama_moe) and the tokenizer files, atomically. Returns the output path.
    """
    src = Path(src_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} not found: {str(src)!r} is not a Hugging Face model directory.")
    v1 = json.loads(config_path.read_text())
    if not is_llama_moe_v1_config(v1):
        raise ValueError(
            f"{str(src)!r} is not a LLaMA-MoE v1 checkpoint: its config.json has no `num_selects` "
            "(a llama_moe checkpoint of this package needs no import)."
        )
    config, fold = llama_moe_v1_config(v1)
    exporter = get_exporter(format_name, config)
    reader = CheckpointReader(src, allow_pickle=True)  # v1 releases are .bin files
    result = write_converted_checkpoint(
        plan_our_tensors(reader, config, fold),
        exporter,
        src,
        out_dir,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        desc="Importing LLaMA-MoE v1",
    )
    if verbose:
        tqdm.write(
            f"Imported LLaMA-MoE v1 into {result.path!r} ({format_name}): {config.num_hidden_layers} MoE layers, "
            f"{config.num_local_experts} experts, top-{config.num_experts_per_tok}, "
            f"{result.bytes_written / 1e9:.2f} GB in {result.num_shards} shard(s)."
        )
    return result.path


def _v1_target_name(name: str) -> str | None:
    for source, target in V1_KEY_MAP.items():
        match = template_regex(source).match(name)
        if match:
            return target.format(layer=match.group("layer"))
    return None


__all__ = [
    "import_llama_moe_v1",
    "llama_moe_v1_config",
    "is_llama_moe_v1_config",
    "plan_our_tensors",
    "V1_KEY_MAP",
    "V1_EXPERT_KEYS",
]
