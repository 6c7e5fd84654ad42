"""Recipes and flags, bad recipes failing before training, exact freezing, MoE statistics, the trainer's loss."""

import os
import types

import pytest
import torch
import yaml

from llama_moe.cli.main import main as cli_main
from llama_moe.training.arguments import parse_arguments
from llama_moe.training.callbacks import (
    FreezeCallback,
    active_parameters,
    load_statistics,
    parameters_in_group,
    parse_freeze,
)
from tests.conftest import tiny_moe_config
from tests.training.helpers import train_args

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "training", "recipes")


def test_recipe_then_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"learning_rate": 1e-3, "max_steps": 7, "max_length": 32, "dataset": ["a=/x"]}))
    options, config = parse_arguments(
        ["--config", str(recipe), "--max_steps", "9", "--dataset", "b=/y", "--dataset", "c=/z"]
    )
    assert (config.learning_rate, config.max_steps, config.max_length) == (1e-3, 9, 32)
    assert options.dataset == ["b=/y", "c=/z"]  # repeated flags collected; flags replace the recipe's list
    assert config.ignore_data_skip and config.dataloader_num_workers == 0 and not config.packing


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "llama_moe_cpt.yaml",
            dict(
                learning_rate=2e-4,
                warmup_steps=100,
                adam_beta1=0.9,
                adam_beta2=0.95,
                weight_decay=0.1,
                max_grad_norm=1.0,
                router_aux_loss_coef=1e-2,
            ),
        ),
        ("llama3_meets_moe.yaml", dict(learning_rate=3e-5, warmup_steps=100)),
        ("cpu_smoke.yaml", dict(max_steps=20)),
    ],
)
def test_shipped_recipes(name, expected):
    options, config = parse_arguments(["--config", os.path.join(RECIPES, name), "--bf16", "false"])
    for key, value in expected.items():
        assert getattr(config, key) == pytest.approx(value), key
    if name != "cpu_smoke.yaml":
        scheduler = config.lr_scheduler_type
        assert str(scheduler).endswith("COSINE_WITH_MIN_LR") or scheduler == "cosine_with_min_lr"
    if name == "llama_moe_cpt.yaml":
        assert config.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    if name == "llama3_meets_moe.yaml":
        assert config.learning_rate * config.lr_scheduler_kwargs["min_lr_rate"] == pytest.approx(3e-7)
        assert (options.num_experts, options.num_experts_per_tok, options.method) == (8, 2, "copy")


@pytest.mark.parametrize(
    "change, message",
    [
        (["--dataset_weights", "code=1,web=1"], "unknown domain(s) ['web']"),
        (["--dataset_weights", "code=0,docs=0"], "do not sum to a positive number"),
        (["--dataset_weights", "code=-1,docs=2"], "must be finite and >= 0"),
        (["--max_length", "100000"], "above the model's max_position_embeddings (256)"),
        (["--dataset", "extra=/no/such/file.jsonl"], "/no/such/file.jsonl does not exist"),
        (["--dataset", "hub=someorg/somecorpus"], "cannot be read offline"),
        (["--sampling", "zipf"], "--sampling 'zipf' is unknown"),
        (["--freeze", "gate"], "--freeze 'gate' is unknown"),
        (["--reference_losses", "code=1"], "missing ['docs']"),
    ],
)
def test_bad_recipes_fail_before_training(tmp_path, corpora, tiny_model_dir, capsys, change, message):
    args = train_args(tiny_model_dir, corpora, tmp_path / "out", 3) + change
    assert cli_main(["train", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dynamic_sampling_without_an_interval_evaluates_every_tenth_of_the_run(
    tmp_path, corpora, tiny_model_dir, capsys
):
    from llama_moe.training.arguments import parse_arguments

    options, config = parse_arguments(
        train_args(tiny_model_dir, corpora, tmp_path / "out", 50) + ["--sampling", "dynamic"]
    )
    assert str(config.eval_strategy) in ("steps", "IntervalStrategy.STEPS") and config.eval_steps == 5
    assert "evaluating every 5 steps" in capsys.readouterr().out
    _, chosen = parse_arguments(
        train_args(tiny_model_dir, corpora, tmp_path / "out", 50)
        + ["--sampling", "dynamic", "--eval_strategy", "steps", "--eval_steps", "7"]
    )
    assert chosen.eval_steps == 7


def test_cpu_runs_do_not_pin_memory_nor_warn_about_checkpointing(tmp_path, corpora, tiny_model_dir):
    import warnings

    from llama_moe.training.arguments import parse_arguments

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, config = parse_arguments(train_args(tiny_model_dir, corpora, tmp_path / "out", 3))
    assert config.dataloader_pin_memory is False and not config.gradient_checkpointing


def test_unknown_recipe_key_and_missing_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learnin_rate: 0.1\n")
    assert cli_main(["train", "--config", str(recipe), "--max_steps", "1"]) == 2
    assert "learnin_rate" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def _freeze_test_model():
    from llama_moe.modeling import LlamaMoEForCausalLM

    config = tiny_moe_config(
        num_hidden_layers=3,
        moe_layers=[0, 2],
        router_type="mlp",
        router_noise="noisy_topk",
        shared_expert_intermediate_size=16,
        shared_expert_gate=True,
        tie_word_embeddings=False,
    )
    return LlamaMoEForCausalLM(config)


def test_freeze_groups_name_exactly_their_parameters():
    model = _freeze_test_model()
    routers = parameters_in_group(model, "routers")
    assert sorted(routers) == sorted(
        f"model.layers.{i}.mlp.gate.{w}" for i in (0, 2) for w in ("weight", "out_weight", "noise_weight")
    )  # not experts.gate_up_proj, not layer 1's dense mlp.gate_proj, not the shared expert's gates
    FreezeCallback(model, frozen=["attention", "embeddings"])
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    expected = {name for name, _ in model.named_parameters() if ".self_attn." in name} | {"model.embed_tokens.weight"}
    assert frozen == expected
    assert model.lm_head.weight.requires_grad  # untied: the head is its own group


def test_freeze_parse_and_errors():
    assert parse_freeze("routers_only:100, attention") == (100, ["attention"])
    assert parse_freeze(None) == (0, [])
    with pytest.raises(ValueError, match="routers_only:N"):
        parse_freeze("routers_only")
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="with routers"):
        FreezeCallback(dense, routers_only=5)


def test_routers_only_phase_drops_every_other_gradient():
    model = _freeze_test_model()
    freezer = FreezeCallback(model, routers_only=2)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids, output_router_logits=True).loss.backward()
    freezer.drop_grads(global_step=1)
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    routers = set(parameters_in_group(model, "routers"))
    assert {n for n in routers if not n.endswith("noise_weight")} <= with_grad <= routers
    model.zero_grad()
    model(input_ids=ids, labels=ids, output_router_logits=True).loss.backward()
    freezer.drop_grads(global_step=2)  # phase over: everything keeps its gradient
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_active_parameters_counts_top_k_of_the_experts():
    model = _freeze_test_model()
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for layer in (0, 2) for p in model.model.layers[layer].mlp.experts.parameters())
    inactive_share = 1 - config.num_experts_per_tok / config.num_local_experts
    expected = total - config.vocab_size * config.hidden_size - experts * inactive_share
    assert active_parameters(model) == round(expected)


def test_load_statistics_by_hand():
    logs = load_statistics({0: torch.tensor([3.0, 1.0, 0.0, 0.0]), 3: torch.tensor([1.0, 1.0, 1.0, 1.0])}, {0: 4.0}, 2)
    assert [logs[f"moe/layer_0/expert_{e}"] for e in range(4)] == [0.75, 0.25, 0.0, 0.0]
    mean, std = 0.25, (((0.5) ** 2 + 0 + 0.25**2 * 2) / 4) ** 0.5
    assert logs["moe/layer_0/load_cv"] == pytest.approx(std / mean, abs=1e-4)
    assert logs["moe/layer_3/load_cv"] == 0.0 and logs["moe/layer_3/load_entropy"] == pytest.approx(1.0)
    entropy = -(0.75 * torch.log(torch.tensor(0.75)) + 0.25 * torch.log(torch.tensor(0.25))).item()
    entropy /= torch.log(torch.tensor(4.0)).item()
    assert logs["moe/layer_0/load_entropy"] == pytest.approx(entropy, abs=1e-4)
    assert logs["moe/dropped_fraction"] == pytest.approx(4.0 / (4.0 + 4.0 + 4.0))  # dropped / (routed + dropped)


def _trainer_loss(model, ids, steps):
    """MoETrainer.compute_loss on a stand-in trainer (one process, `steps` accumulation steps, 30 label tokens in
    the accumulated batch), the model's own outputs and the token-loss sum it should be built from."""
    from llama_moe.training.trainer import MoETrainer

    fake = types.SimpleNamespace(
        model=model,
        model_accepts_loss_kwargs=True,
        current_gradient_accumulation_steps=steps,
        args=types.SimpleNamespace(average_tokens_across_devices=False),
        moe_logging=None,
        accelerator=types.SimpleNamespace(num_processes=1),
        _router_metrics={"aux_loss": [], "z_loss": []},
        distiller=None,
    )
    loss = MoETrainer.compute_loss(fake, model, {"input_ids": ids, "labels": ids}, num_items_in_batch=torch.tensor(30))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    logits = out.logits[:, :-1].reshape(-1, 128)
    token_sum = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum")
    return fake, loss, out, token_sum


@pytest.mark.parametrize("steps", [1, 4])
def test_trainer_loss_is_token_loss_plus_weighted_router_losses(steps):
    from llama_moe.modeling import LlamaMoEForCausalLM
    from llama_moe.training.trainer import MoETrainer

    model = LlamaMoEForCausalLM(
        tiny_moe_config(router_aux_loss_coef=0.3, router_z_loss_coef=0.05, output_router_logits=True)
    )
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    fake, loss, out, token_sum = _trainer_loss(model, ids, steps)
    layers = len(model.config.moe_layers)  # the router coefficients count per MoE layer
    expected = token_sum / 30 + layers * (0.3 * out.aux_loss + 0.05 * out.z_loss) / steps
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert fake._router_metrics["aux_loss"][0].item() == pytest.approx(out.aux_loss.item())
    assert fake._router_metrics["z_loss"][0].item() == pytest.approx(out.z_loss.item())
    model.eval()
    eval_loss = MoETrainer.compute_loss(fake, model, {"input_ids": ids, "labels": ids})
    assert eval_loss.item() == pytest.approx((token_sum / 30).item(), rel=1e-5)  # evaluation: token loss only


def test_trainer_takes_mixtral_router_loss_apart_before_dividing_it():
    """A model without `language_loss` (Mixtral adds coef * aux to its loss): the trainer still divides the router
    term, and only it, by the accumulation steps."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        output_router_logits=True,
        router_aux_loss_coef=0.3,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).train()
    ids = torch.randint(0, 128, (2, 16))
    _, loss, out, token_sum = _trainer_loss(model, ids, 4)
    assert loss.item() == pytest.approx((token_sum / 30 + 0.3 * out.aux_loss / 4).item(), rel=1e-5)


def test_moe_logging_counts_drops_and_mfu_from_active_parameters():
    from llama_moe.modeling import LlamaMoEForCausalLM
    from llama_moe.training.callbacks import MoELoggingCallback, flops_per_token

    model = LlamaMoEForCausalLM(tiny_moe_config(capacity_factor=0.5))
    logger = MoELoggingCallback(model, sequence_length=16, num_processes=1, peak_flops=1e9)
    logger.on_train_begin(None, None, None)
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids)
    dropped = model.dropped_slots()
    loads = model.expert_load()
    logger.add_tokens(ids.numel())
    logs = logger.metrics()
    slots = ids.numel() * model.config.num_experts_per_tok
    assert logs["moe/dropped_fraction"] == pytest.approx(sum(dropped.values()) / (slots * len(dropped)))
    assert logs["moe/dropped_fraction"] > 0  # capacity 0.5 must drop slots
    assert logs["moe/layer_1/expert_0"] == pytest.approx(loads[1][0].item() / loads[1].sum().item(), abs=1e-4)
    expected_flops = 6 * active_parameters(model) + 12 * 2 * 64 * 16
    assert flops_per_token(model, 16) == expected_flops
    assert logs["mfu"] == pytest.approx(logs["tokens_per_second"] * expected_flops / 1e9, rel=1e-3)
    model.eval()
    model(input_ids=ids)  # evaluation passes are not counted
    assert "moe/dropped_fraction" not in logger.metrics()


def test_top_k_has_both_spellings_in_train_and_upcycle():
    from llama_moe.cli.upcycle import build_parser as upcycle_parser
    from llama_moe.training.arguments import parse_arguments

    options, _ = parse_arguments(
        ["--upcycle_from", "base", "--output_dir", "out", "--max_steps", "1", "--max_length", "64", "--top_k", "4"]
    )
    assert options.num_experts_per_tok == 4
    assert upcycle_parser().parse_args(["base", "out", "--num-experts-per-tok", "3"]).top_k == 3
