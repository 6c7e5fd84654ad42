"""`--upcycle_from`: upcycle a dense Llama in memory at start, then train; dynamic references from the dense base."""

import json

import pytest
import torch

from tests.training.conftest import VOCAB
from tests.training.helpers import run_train, train_args


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    folder = tmp_path_factory.mktemp("dense")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_upcycle_then_train_with_references_from_the_dense_base(tmp_path, corpora, dense_dir):
    from transformers import AutoModelForCausalLM

    from llama_moe.training.data import DomainSpec, DomainStream
    from llama_moe.training.run import held_out_losses

    out = tmp_path / "run"
    args = [a for a in train_args(dense_dir, corpora, out, 2)]
    args[args.index("--model_name_or_path")] = "--upcycle_from"
    flags = [
        "--method",
        "copy",
        "--num_experts",
        "4",
        "--num_experts_per_tok",
        "2",
        "--sampling",
        "dynamic",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "1",
    ]
    assert run_train(args + flags) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "final", trust_remote_code=True)
    assert model.config.model_type == "llama_moe" and model.config.num_local_experts == 4
    assert tuple(model.model.layers[0].mlp.experts.gate_up_proj.shape) == (4, 256, 64)
    state = json.load(open(out / "checkpoint-2" / "mixture_state.json"))
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    validation = {
        name: DomainStream(DomainSpec(name, corpora[name]), tokenizer, 64, 2).validation for name in ("code", "docs")
    }
    assert state["references"] == pytest.approx(held_out_losses(dense, validation), rel=1e-5)
