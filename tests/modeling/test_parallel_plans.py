"""Tensor- and expert-parallel plans: every entry names a part of the model, every weight of attention, MLPs and
experts is covered, and transformers' own TP + EP (`DistributedConfig(tp_size=2, ep_size=2)`) runs the model on 2 CPU
processes with the single-process logits, tokens and gradients."""

import json
import os
import subprocess
import sys

import pytest
from transformers.distributed.parallel_utils import _get_parameter_plan

from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import tiny_moe_config

HERE = os.path.dirname(__file__)
LAYOUTS = {
    "all MoE": dict(),
    "dense first, shared expert": dict(moe_layers=[1], shared_expert_intermediate_size=16, shared_expert_gate=True),
}


def matches(plan, name, is_weight=True):
    return _get_parameter_plan(name, plan, is_weight=is_weight) is not None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_plan_entry_names_a_part_of_the_model(layout):
    """What transformers' test_tp_plan_matches_params checks: a rule that matches nothing is a typo or a layout
    the plan does not fit (Llama's dense MLP rules in an all-MoE model)."""
    model = LlamaMoEForCausalLM(tiny_moe_config(**LAYOUTS[layout]))
    params = [name for name, _ in model.named_parameters()]
    modules = [name for name, _ in model.named_modules()]
    for plan in (model.tp_plan, model.ep_plan):
        assert plan
        for pattern in plan:
            assert any(matches({pattern: ""}, p) for p in params) or any(
                matches({pattern: ""}, m, is_weight=False) for m in modules
            ), pattern


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_mlps_and_experts_are_all_split(layout):
    """No projection left replicated on every rank: attention and dense/shared MLPs by TP, routed experts by EP.
    The router and the norms stay replicated (small, and every rank routes the same tokens)."""
    model = LlamaMoEForCausalLM(tiny_moe_config(**LAYOUTS[layout]))
    for name, _ in model.named_parameters():
        split = matches(model.tp_plan, name) or matches(model.ep_plan, name)
        replicated = name.endswith(("norm.weight", "mlp.gate.weight", "shared_expert_gate.weight"))
        assert split != replicated, name


@pytest.mark.slow
def test_tensor_and_expert_parallel_on_two_cpu_processes_match_one(tmp_path):
    model = LlamaMoEForCausalLM(
        tiny_moe_config(
            moe_layers=[1, 2],
            num_hidden_layers=3,
            shared_expert_intermediate_size=16,
            shared_expert_gate=True,
            tie_word_embeddings=False,
        )
    )
    model.save_pretrained(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29571",
        os.path.join(HERE, "parallel_worker.py"),
        str(tmp_path / "model"),
        str(tmp_path / "rank"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for rank in (0, 1):
        report = json.load(open(tmp_path / f"rank{rank}.json"))
        assert report["world"] == 2
        assert report["logits_diff"] < 1e-5 and report["same_tokens"]
        assert max(report["grad_diff"].values()) < 1e-5, report["grad_diff"]
        local, whole = report["local_numel"], report["full_numel"]
        for name in whole:
            if ".experts." in name or "self_attn" in name or "shared_expert." in name:
                assert local[name] == whole[name] // 2, name  # each rank holds half of every split weight
