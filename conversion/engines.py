"""Which serving engines compute an exported checkpoint exactly as our model does, and why not where they do not.

One rule table per output format, from the engines' own sources (vLLM's `qwen2_moe.py` / `mixtral.py`, llama.cpp's
`src/models/{llama,qwen2moe,granite}.cpp` as vendored by llama-cpp-python 0.3.36) and checked by
`benchmarks/serving_check.py`, the llama.cpp architecture a GGUF export gets (`gguf_architecture`), and which
tensors llama.cpp's quantizer would store in a fallback type. Pure functions of the config: nothing here reads
weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .options import DTYPES

ENGINES = ("transformers", "vllm", "llama.cpp")
ENGINE_NAMES = {"transformers": "transformers", "vllm": "vLLM", "llama.cpp": "llama.cpp"}


# Measured by benchmarks/serving_check.py: llama.cpp's default float16 KV cache flips routing near ties.
F32_KV_ADVICE = (
    "keep the KV cache in float32 (-ctk f32 -ctv f32): its default float16 cache flips routers that "
    "sit near ties (the random split's always)"
)
# Measured by the same check: in bfloat16 every engine, transformers itself included, changes greedy tokens of
# upcycled models whose routers sit near ties (all but the copy method), each as far from float32 as the others.
FLOAT32_ADVICE = (
    "Exact agreement between engines needs float32 (vLLM --dtype float32, f32 GGUF, f32 KV cache): "
    "in bfloat16 every engine, transformers included, rounds routing near ties its own way, so greedy "
    "tokens of an upcycled model differ from its float32 ones and from each other's "
    "(measured: README, serving check)."
)


# RoPE variants the GGUF exporter writes (conversion/gguf_export.py); llama.cpp reads each from the file's metadata.
ROPE_TYPES = ("default", "linear", "llama3")


class EngineSupport(NamedTuple):
    engine: str
    exact: bool  # computes what our model computes, up to floating-point rounding
    note: str  # how to run it, or why it cannot


def _dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    return DTYPES.get(dtype) if isinstance(dtype, str) else dtype


def _llama_cpp_qwen2moe_limits(config) -> list[str]:
    """Why llama.cpp's qwen2moe (via convert_hf_to_gguf.py) would compute something else; empty when it fits."""
    reasons = []
    if len(config.moe_layers) < config.num_hidden_layers:
        reasons.append("its qwen2moe has an MoE block in every layer (no mlp_only_layers)")
    if config.norm_topk_prob:
        reasons.append("its qwen2moe never renormalizes the top-k weights (norm_topk_prob=True here)")
    if not config.shared_expert_gate and _dtype(config) == torch.float16:
        reasons.append(
            "float16 cannot hold the tiny shared-expert gate that keeps its sigmoid, computed as silu(x)/x, off 0/0 "
            "(export in bfloat16 or float32)"
        )
    return reasons


def gguf_architecture(config, explain: list[str]) -> str | None:
    """The llama.cpp architecture that computes this configuration exactly when written by `--format gguf`
    (conversion/gguf_export.py), or None (reasons appended). From the routing: `llama` (Mixtral) for renormalized
    top-k without a shared expert, `granitemoe` with an ungated one, `qwen2moe` for top-k weights that are not
    renormalized."""
    reasons = []
    dense = [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]
    if dense:
        reasons.append(f"layers {dense} are dense, but every llama.cpp MoE architecture has MoE in every layer")
    if config.router_type != "linear":
        reasons.append(f"router_type={config.router_type!r}: llama.cpp's routers are one linear layer")
    if config.router_noise == "noisy_topk":
        reasons.append("router_noise='noisy_topk': llama.cpp has no learned noisy gate")
    if config.capacity_factor is not None:
        reasons.append(f"capacity_factor={config.capacity_factor}: llama.cpp is dropless")
    if config.attention_bias or config.mlp_bias:
        reasons.append("attention_bias/mlp_bias: not written to GGUF by this exporter")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        reasons.append(f"rope_type={rope_type!r}: this exporter writes {list(ROPE_TYPES)}")
    if config.norm_topk_prob and config.shared_expert_intermediate_size and config.shared_expert_gate:
        reasons.append(
            "a gated shared expert with renormalized top-k: llama.cpp's qwen2moe gates its shared expert "
            "but never renormalizes, granitemoe renormalizes but has no gate"
        )
    explain.extend(reasons)
    if reasons:
        return None
    if not config.norm_topk_prob:
        return "qwen2moe"
    return "granitemoe" if config.shared_expert_intermediate_size else "llama"


def engine_support(format_name: str, config) -> list[EngineSupport]:
    """One row per engine in ENGINES for a checkpoint of `config` written in `format_name`."""
    if format_name == "llama_moe":
        return [
            EngineSupport("transformers", True, "AutoModelForCausalLM with trust_remote_code=True"),
            EngineSupport("vllm", False, "vLLM has no llama_moe architecture: export to mixtral or qwen2_moe"),
            EngineSupport("llama.cpp", False, "llama.cpp has no llama_moe architecture: export to gguf"),
        ]
    if format_name == "mixtral":
        return [
            EngineSupport("transformers", True, "MixtralForCausalLM, no remote code"),
            EngineSupport("vllm", True, "served as MixtralForCausalLM"),
            EngineSupport(
                "llama.cpp",
                True,
                "after convert_hf_to_gguf.py (or --format gguf); " + F32_KV_ADVICE,
            ),
        ]
    if format_name == "qwen2_moe":
        reasons = _llama_cpp_qwen2moe_limits(config)
        llama_cpp = (
            EngineSupport("llama.cpp", True, "after convert_hf_to_gguf.py (or --format gguf); " + F32_KV_ADVICE)
            if not reasons
            else EngineSupport("llama.cpp", False, "; ".join(reasons) + ": export to gguf instead")
        )
        return [
            EngineSupport("transformers", True, "Qwen2MoeForCausalLM, no remote code"),
            EngineSupport("vllm", True, "served as Qwen2MoeForCausalLM"),
            llama_cpp,
        ]
    if format_name == "gguf":
        reasons: list[str] = []
        arch = gguf_architecture(config, reasons)
        return [
            EngineSupport(
                "transformers",
                arch == "qwen2moe",
                "Qwen2MoeForCausalLM.from_pretrained(folder, gguf_file=..., config=<the qwen2_moe export's config>)"
                if arch == "qwen2moe"
                else "transformers' GGUF reader has no experts for llama.cpp's llama and granitemoe files",
            ),
            EngineSupport("vllm", False, "serve the mixtral or qwen2_moe export (vLLM's GGUF loading is not checked)"),
            EngineSupport(
                "llama.cpp",
                arch is not None,
                f"llama-cli / llama-server -m FILE.gguf (architecture {arch}); {F32_KV_ADVICE}"
                if arch
                else "; ".join(reasons),
            ),
        ]
    raise ValueError(f"Unknown format {format_name!r}.")


# llama.cpp stores a tensor in a quantized type only when its rows (the input dimension, GGUF's ne0) are a multiple
# of the type's block; llama-quantize stores the others in a fallback type ("N of M tensor(s) required fallback
# quantization"). K-quants (what Q4_K_M and friends mostly use) have blocks of 256 values, the legacy types of 32.
QUANT_BLOCKS = {"K-quants (Q2_K..Q6_K, as in Q4_K_M)": 256, "Q8_0, Q4_0, Q5_0 and the other legacy types": 32}


def gguf_row_lengths(config) -> dict[str, tuple[int, str]]:
    """llama.cpp's name of each matrix kind of an export (per layer) -> (its row length, the config field it is)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads * getattr(config, "head_dim", hidden // config.num_attention_heads)
    rows = {
        "token_embd / output": (hidden, "hidden_size"),
        "attn_q, attn_k, attn_v": (hidden, "hidden_size"),
        "attn_output": (heads, "num_attention_heads x head_dim"),
        "ffn_gate_exps, ffn_up_exps": (hidden, "hidden_size"),
        "ffn_down_exps": (config.moe_intermediate_size, "moe_intermediate_size"),
    }
    if config.shared_expert_intermediate_size:
        rows["ffn_gate_shexp, ffn_up_shexp"] = (hidden, "hidden_size")
        rows["ffn_down_shexp"] = (config.shared_expert_intermediate_size, "shared_expert_intermediate_size")
    if len(config.moe_layers) < config.num_hidden_layers:
        rows["ffn_gate, ffn_up (dense layers)"] = (hidden, "hidden_size")
        rows["ffn_down (dense layers)"] = (config.intermediate_size, "intermediate_size")
    return rows


def quantization_fallbacks(config, block: int) -> list[str]:
    """The tensors llama-quantize would store in a fallback type for a quantization with this block, and why."""
    return [
        f"{name} (rows of {length} = {field}, not a multiple of {block})"
        for name, (length, field) in gguf_row_lengths(config).items()
        if length % block
    ]


def quantization_lines(config) -> list[str]:
    """One line per family of llama.cpp quantization types: which tensors keep the asked type, which fall back."""
    lines = []
    for family, block in QUANT_BLOCKS.items():
        fallbacks = quantization_fallbacks(config, block)
        lines.append(
            f"llama.cpp {family}: "
            + (
                "every matrix keeps the asked type"
                if not fallbacks
                else "stored in a fallback type (llama-quantize's 'fallback quantization'): "
                + "; ".join(fallbacks)
                + (
                    " (carve: --width-multiple 256 chooses expert widths that quantize)"
                    if config.hidden_size % block == 0 and config.moe_intermediate_size % block
                    else ""
                )
            )
        )
    return lines


def engine_refusal(format_name: str, config, engine: str) -> str | None:
    """The one-line reason `engine` cannot serve this export exactly, or None when it can."""
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}: choose one of {list(ENGINES)}.")
    row = next(row for row in engine_support(format_name, config) if row.engine == engine)
    if row.exact:
        return None
    return f"{ENGINE_NAMES[engine]} cannot compute this {format_name} checkpoint as llama-moe does: {row.note}."


def engine_table_markdown(format_name: str, config) -> str:
    lines = ["| engine | computes this checkpoint as we do | how / why not |", "|---|---|---|"]
    for row in engine_support(format_name, config):
        lines.append(f"| {ENGINE_NAMES[row.engine]} | {'yes' if row.exact else 'no'} | {row.note} |")
    return "\n".join(lines + ["", FLOAT32_ADVICE, ""] + [f"- {line}" for line in quantization_lines(config)])


def engine_lines(format_name: str, config) -> str:
    """What the CLI prints after writing: one line per engine."""
    return "\n".join(
        [
            f"  {ENGINE_NAMES[row.engine]:<12} {'exact' if row.exact else 'no':<5}  {row.note}"
            for row in engine_support(format_name, config)
        ]
        + ["  " + FLOAT32_ADVICE]
        + ["  " + line for line in quantization_lines(config)]
    )
