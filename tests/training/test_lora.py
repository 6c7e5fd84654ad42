"""LoRA recovery with TRL's flags: adapters reach attention, the shared/dense FFNs and the fused routed experts
through the dropless kernel, routers train in full, checkpoints hold only the adapter and resume from it, and
final/ is the plain model with the adapters merged (it computes what the adapted model computed)."""

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.training.helpers import log_history, run_train, train_args, train_losses

pytest.importorskip("peft")

LORA = dict(use_peft="true", lora_r=4, lora_alpha=8, lora_dropout=0.0)


def test_lora_trains_adapters_merges_them_into_final_and_resumes(tmp_path, corpora, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert run_train(train_args(tiny_model_dir, corpora, out, 4, save_steps=2, **LORA)) == 0
    checkpoint = out / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    # The experts' fused tensors, attention and the routers (in full) all train; the rest stays as it was.
    assert any("experts" in name and "lora_B" in name for name in adapter)
    assert any("q_proj.lora_B" in name for name in adapter)
    assert any(name.endswith("mlp.gate.weight") for name in adapter)
    assert all(adapter[name].abs().max() > 0 for name in adapter if "lora_B" in name and "experts" in name)

    final = out / "final"
    assert "adapter_config.json" not in os.listdir(final) and "modeling_llama_moe.py" in os.listdir(final)
    merged = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    weights = load_file(final / "model.safetensors")
    assert set(weights) == set(start)  # a plain checkpoint of the same model: no adapter names left
    for name in (
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate.weight",
    ):
        assert not torch.equal(weights[name], start[name]), name
    assert torch.equal(weights["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, trust_remote_code=True)
    adapted = PeftModel.from_pretrained(base, checkpoint).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)

    resumed = tmp_path / "resumed"
    args = train_args(tiny_model_dir, corpora, resumed, 4, save_steps=2, **LORA)
    assert run_train(args + ["--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    expected, got = train_losses(log_history(checkpoint)), train_losses(log_history(resumed / "checkpoint-4"))
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_lora_refuses_freezing_and_a_bad_rank_before_loading(tmp_path, corpora, tiny_model_dir, capsys):
    assert run_train(train_args(tiny_model_dir, corpora, tmp_path / "a", 2, freeze="attention", **LORA)) == 2
    assert "--freeze and --use_peft do not combine" in capsys.readouterr().err
    assert run_train(train_args(tiny_model_dir, corpora, tmp_path / "b", 2, **{**LORA, "lora_r": 0})) == 2
    assert "--lora_r must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
