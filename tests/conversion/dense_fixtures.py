"""Tiny dense Llama checkpoints for the upcycling tests: Llama-2 style (MHA, untied) and Llama-3 style (GQA, tied
embeddings, llama3 rope scaling), written with LlamaForCausalLM.save_pretrained; helpers to compare logits."""

import json
import os

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import LLAMA3_ROPE


def llama2_config(**overrides):
    options = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    options.update(overrides)
    return LlamaConfig(**options)


def llama3_config(**overrides):
    options = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_parameters=dict(LLAMA3_ROPE),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    options.update(overrides)
    return LlamaConfig(**options)


STYLES = {"llama2": llama2_config, "llama3": llama3_config}


def write_dense(folder, style: str, seed: int = 0, **overrides) -> str:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(STYLES[style](**overrides)).eval()
    # Spread the FFN weights a little more than the tiny init so routing differences would show in logits.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return str(folder)


def tokens(vocab_size: int = 96, batch: int = 2, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


@torch.no_grad()
def logits_of(model, ids) -> torch.Tensor:
    return model.eval()(ids).logits.float()


def load_dense(folder):
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load_moe(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


def read_tensors(folder) -> dict[str, torch.Tensor]:
    index = os.path.join(folder, "model.safetensors.index.json")
    files = (
        sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    )
    tensors = {}
    for fname in files:
        with safe_open(os.path.join(folder, fname), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def row_index(rows: torch.Tensor) -> dict[bytes, int]:
    """Map each row's exact bytes to its index (to find where an expert's rows came from)."""
    return {rows[i].numpy().tobytes(): i for i in range(rows.shape[0])}
