"""`--format gguf`: a llama_moe checkpoint written as one GGUF file that llama.cpp computes exactly as we do.

The llama.cpp architecture follows from the routing (llama.cpp's sources, `src/models/*.cpp`; the rule is
engines.gguf_architecture):
- `llama` (Mixtral): renormalized top-k, no shared expert;
- `granitemoe`: renormalized top-k plus an ungated shared expert (Granite-MoE-Shared); embedding, residual and
  attention scales left unset (llama.cpp then applies none) and a logit scale of 1;
- `qwen2moe`: top-k weights not renormalized (its fixed rule), with a sigmoid-gated shared expert: ours, or for an
  ungated / missing one the constant gate of formats.py (sigmoid exactly 1/2, never 0/0) and a doubled down_proj.
Every MoE architecture of llama.cpp has MoE in every layer; other configurations are refused before writing.
Tensors stream one at a time from the checkpoint (GGUF needs every tensor's shape before the first byte of data,
which the file headers give). `llama` and `granitemoe` use llama.cpp's interleaved RoPE: q/k rows are permuted as
its converter does; qwen2moe uses transformers' half-split RoPE as is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from llama_moe.modeling import LlamaMoEConfig

from .atomic import atomic_output_file, refuse_existing_output
from .engines import engine_refusal, gguf_architecture
from .formats import (
    NULL_SHARED_EXPERT_SIZE,
    fold_routed_scale,
    fold_router_temperature,
    qwen2_moe_shared_expert_tensors,
)
from .reader import CheckpointReader, is_recomputed_buffer

OUTTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# What numpy hands the GGUF writer per stored dtype (numpy has no bfloat16: its raw bytes, typed by GGML's name).
NUMPY_DTYPES = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(np.uint8),
}

# llama.cpp names a BPE pre-tokenizer by the hash of the token ids of this text (its converter's `chktxt`), so the
# same identifier is computed here. Known hashes for the Llama family; others need `tokenizer_pre=`.
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3 / 3.1 / 3.2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
}


def outtype_of(dtype) -> str:
    """The GGUF outtype that stores `dtype` (a torch dtype or its name) without rounding; f32 for anything else."""
    name = str(dtype).replace("torch.", "")
    return {"bfloat16": "bf16", "float16": "f16"}.get(name, "f32")


def check_gguf_fit(config: LlamaMoEConfig, engine: str | None = None) -> str:
    """The llama.cpp architecture, or ValueError naming every reason llama.cpp would compute something else; with
    `engine`, also refused where that engine would not serve the file as we compute it (engines.py)."""
    reasons: list[str] = []
    arch = gguf_architecture(config, reasons)
    if arch is None:
        lines = "\n".join(f"  - {reason}" for reason in reasons)
        raise ValueError(
            f"llama.cpp cannot compute this configuration as llama-moe does:\n{lines}\n"
            "Write it with --format llama_moe (or qwen2_moe / mixtral for vLLM where they fit) instead."
        )
    refusal = engine and engine_refusal("gguf", config, engine)
    if refusal:
        raise ValueError(refusal)
    return arch


def check_gguf_output(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise ValueError(f"{str(out)!r}: a GGUF output path must end in .gguf.")
    refuse_existing_output(out, overwrite)


def check_gguf_tokenizer(folder: Path, tokenizer_pre: str | None) -> str | None:
    """Refuse a tokenizer the GGUF file could not describe (before any heavy work). Returns the pre-tokenizer name
    of a byte-level BPE tokenizer (`tokenizer_pre`, else detected), None for a byte-fallback (Llama 2) one."""
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ValueError(f"{str(folder)!r} has no tokenizer.json: llama.cpp needs the tokenizer inside the GGUF file.")
    model = json.loads(tokenizer_json.read_text()).get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json model type {model.get('type')!r}: this exporter writes BPE tokenizers.")
    if model.get("byte_fallback"):
        return None
    if tokenizer_pre:
        return tokenizer_pre

    detected = pre_tokenizer_name(AutoTokenizer.from_pretrained(folder))
    if detected is None:
        raise ValueError(
            "llama.cpp needs the name of this tokenizer's pre-tokenizer and it is not one this exporter knows "
            f"({list(KNOWN_PRE_TOKENIZERS.values())}): pass llama.cpp's name for it with --gguf-tokenizer-pre "
            "(see its src/llama-vocab.cpp)."
        )
    return detected


def interleave_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q/k rows from transformers' half-split RoPE layout to llama.cpp's pairwise one (its converter's permute)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(config: LlamaMoEConfig) -> torch.Tensor:
    """llama.cpp's `rope_freqs.weight` for llama3 RoPE: default inverse frequencies over the scaled ones, from
    transformers' own RoPE functions."""
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return (default / scaled).float()


class GgufTensorMap:
    """Our tensor names to llama.cpp's, with the changes one architecture needs (permuted q/k, stacked experts
    split into gate and up) and the rules formats.py holds for the safetensors exports (folded scales, Qwen2-MoE's
    shared expert)."""

    def __init__(self, config: LlamaMoEConfig, arch: str):
        self.config, self.arch = config, arch

    def __call__(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if self.arch != "qwen2moe":
            return self._rename(name, tensor)
        pairs = qwen2_moe_shared_expert_tensors(self.config, name, tensor)
        return [out for pair in pairs for out in self._rename(*pair)]

    def _rename(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        c = self.config
        if name == "model.embed_tokens.weight":
            out = [("token_embd.weight", tensor)]
            if c.tie_word_embeddings and self.arch == "qwen2moe":  # its output matrix is required
                out.append(("output.weight", tensor))
            return out
        if name == "model.norm.weight":
            return [("output_norm.weight", tensor)]
        if name == "lm_head.weight":
            return [("output.weight", tensor)]
        parts = name.split(".")
        if parts[:2] != ["model", "layers"]:
            raise ValueError(f"Tensor {name!r} has no place in a GGUF file of this exporter.")
        layer, rest = parts[2], ".".join(parts[3:])
        blk = f"blk.{layer}."
        simple = {
            "input_layernorm.weight": "attn_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
            "self_attn.v_proj.weight": "attn_v.weight",
            "self_attn.o_proj.weight": "attn_output.weight",
            "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
            "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
            "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
        }
        if rest in simple:
            return [(blk + simple[rest], tensor)]
        if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            if self.arch != "qwen2moe":
                heads = c.num_attention_heads if rest.startswith("self_attn.q") else c.num_key_value_heads
                tensor = interleave_rope_rows(tensor, heads)
            return [(blk + ("attn_q.weight" if rest.startswith("self_attn.q") else "attn_k.weight"), tensor)]
        if rest == "mlp.gate.weight":
            return [(blk + "ffn_gate_inp.weight", fold_router_temperature(c, tensor))]
        if rest == "mlp.experts.gate_up_proj":
            width = tensor.shape[1] // 2
            return [(blk + "ffn_gate_exps.weight", tensor[:, :width]), (blk + "ffn_up_exps.weight", tensor[:, width:])]
        if rest == "mlp.experts.down_proj":
            return [(blk + "ffn_down_exps.weight", fold_routed_scale(c, tensor))]
        if rest == "mlp.shared_expert_gate.weight":
            return [(blk + "ffn_gate_inp_shexp.weight", tensor.reshape(-1))]
        raise ValueError(f"Tensor {name!r} has no place in a GGUF file of this exporter.")


def stored_dtype(gguf_name: str, shape: tuple[int, ...], outtype: torch.dtype) -> torch.dtype:
    """As llama.cpp's converter: 1-D tensors (norms, shared-expert gate) and routers stay float32."""
    if len(shape) == 1 or gguf_name.endswith("ffn_gate_inp.weight") or gguf_name == "rope_freqs.weight":
        return torch.float32
    return outtype


def _numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    tensor = tensor.detach().to(dtype).contiguous()
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.uint8)
    return tensor.numpy()


def _ggml_type(dtype: torch.dtype):
    return {
        torch.float32: gguf.GGMLQuantizationType.F32,
        torch.float16: gguf.GGMLQuantizationType.F16,
        torch.bfloat16: gguf.GGMLQuantizationType.BF16,
    }[dtype]


def add_model_metadata(writer, config: LlamaMoEConfig, arch: str, name: str, outtype: str) -> None:
    c = config
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    if c.rope_parameters.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(c.rope_parameters["factor"]))
    writer.add_vocab_size(c.vocab_size)
    writer.add_expert_count(c.num_local_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    if arch == "qwen2moe":
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size or NULL_SHARED_EXPERT_SIZE)
    else:
        writer.add_feed_forward_length(c.moe_intermediate_size)  # llama / granitemoe: one expert's width
    if arch == "granitemoe":
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
        writer.add_logit_scale(1.0)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    }
    writer.add_file_type(file_types[outtype])


def add_tokenizer(writer, folder: Path, vocab_size: int, tokenizer_pre: str | None) -> None:
    """llama.cpp's tokenizer keys from the checkpoint's tokenizer.json: SentencePiece-style byte-fallback BPE
    (Llama 2) as model `llama`, byte-level BPE (Llama 3, SmolLM) as `gpt2` with its pre-tokenizer name."""
    pre = check_gguf_tokenizer(folder, tokenizer_pre)
    if pre is None:
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
    else:
        tokens, types = byte_level_vocab(folder, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def pre_tokenizer_name(tokenizer) -> str | None:
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    return KNOWN_PRE_TOKENIZERS.get(digest)


def byte_level_vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types by id, as llama.cpp's converter lists them."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def export_gguf(
    src_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    outtype: str | None = None,
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    engine: str | None = None,
) -> str:
    """Write the llama_moe checkpoint `src_dir` as the GGUF file `out_file` (atomically), in `outtype` (f32, f16,
    bf16; default: the checkpoint's dtype). Every check (fit, `engine`, tokenizer) runs before a byte is written;
    returns the file's path."""
    src, out = Path(src_dir), Path(out_file)
    config = LlamaMoEConfig.from_pretrained(src)
    outtype = outtype or outtype_of(config.dtype)
    if outtype not in OUTTYPES:
        raise ValueError(f"Unknown GGUF outtype {outtype!r}: choose one of {list(OUTTYPES)}.")
    check_gguf_output(out, overwrite)
    arch = check_gguf_fit(config, engine)
    reader = CheckpointReader(src)
    tensor_map = GgufTensorMap(config, arch)
    names = [
        n
        for n in reader.keys()
        if not is_recomputed_buffer(n) and not (n == "lm_head.weight" and config.tie_word_embeddings)
    ]
    outdtype = OUTTYPES[outtype]

    # The plan: every output tensor's name, shape and stored dtype, from the headers (meta tensors).
    extra: list[tuple[str, torch.Tensor]] = []
    if (config.rope_parameters or {}).get("rope_type") == "llama3":
        extra.append(("rope_freqs.weight", llama3_rope_factors(config)))
    plan = []
    for name in names:
        shape, dtype = reader.shape_and_dtype(name)
        for new_name, meta in tensor_map(name, torch.empty(shape, dtype=dtype, device="meta")):
            plan.append((new_name, tuple(meta.shape)))
    plan += [(name, tuple(tensor.shape)) for name, tensor in extra]
    plan = [(name, shape, stored_dtype(name, shape, outdtype)) for name, shape in plan]

    writer = gguf.GGUFWriter(path=None, arch=arch)
    add_model_metadata(writer, config, arch, src.resolve().name, outtype)
    add_tokenizer(writer, src, config.vocab_size, tokenizer_pre)
    for new_name, shape, dtype in plan:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if dtype == torch.bfloat16:
            byte_shape = (*shape[:-1], shape[-1] * 2)
            writer.add_tensor_info(new_name, byte_shape, NUMPY_DTYPES[dtype], nbytes, raw_dtype=_ggml_type(dtype))
        else:
            writer.add_tensor_info(new_name, shape, NUMPY_DTYPES[dtype], nbytes)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name in tqdm(names, desc="Exporting to gguf", unit="tensor", disable=not progress):
            yield from tensor_map(name, reader.get(name))
        yield from extra

    with atomic_output_file(out, overwrite=overwrite) as tmp:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (planned_name, shape, dtype), (new_name, tensor) in zip(plan, stream(), strict=True):
            if planned_name != new_name or tuple(tensor.shape) != shape:
                raise RuntimeError(
                    f"GGUF stream out of plan: {new_name} {tuple(tensor.shape)}, planned {planned_name} {shape}"
                )
            writer.write_tensor_data(_numpy(tensor, dtype))
        writer.close()
    return os.fspath(out)
