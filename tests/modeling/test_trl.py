"""TRL compatibility: SFTTrainer trains LlamaMoE (fused LM head, aux loss from router logits) for a step."""

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import tiny_moe_config, tiny_tokenizer


def test_sft_trainer_one_step_updates_experts_and_router(tmp_path):
    model = LlamaMoEForCausalLM(tiny_moe_config(router_aux_loss_coef=0.02, pad_token_id=0, eos_token_id=1))
    for name in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits"):
        assert hasattr(model.config, name), name
    tokenizer = tiny_tokenizer()
    texts = [" ".join(f"w{(i * 7 + j) % 120}" for j in range(24)) for i in range(8)]
    dataset = Dataset.from_dict({"text": texts})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        max_length=32,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.aux_loss_enabled
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    logged = [entry for entry in trainer.state.log_history if "aux_loss" in entry]
    assert logged and logged[0]["aux_loss"] > 0
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert "model.layers.0.mlp.gate.weight" in changed
    assert "model.layers.0.mlp.experts.gate_up_proj" in changed
