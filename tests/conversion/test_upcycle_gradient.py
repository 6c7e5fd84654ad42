"""The gradient-importance method (LLaMA-MoE Sharing-Inner / Sharing-Inter) on a tiny Llama with a word tokenizer."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llama_moe.conversion import upcycle
from llama_moe.conversion.methods.gradient import neuron_importance, select_neurons
from llama_moe.conversion.reader import open_dense
from tests.conversion.dense_fixtures import load_moe, logits_of, read_tensors, row_index, tokens, write_dense

I = 96


def calibration_text() -> str:
    import argparse
    import json as json_module
    import logging

    return "\n".join(m.__doc__ for m in (json_module, argparse, logging)) * 3


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense") / "llama2"
    write_dense(folder, "llama2")
    words = sorted({w for w in calibration_text().split()}, key=calibration_text().count, reverse=True)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words[:95])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    with open(path, "w") as f:
        for paragraph in calibration_text().split("\n\n"):
            f.write(json.dumps({"text": paragraph}) + "\n")
    return str(path)


def test_importance_matches_autograd_reference(dense_dir):
    """One group: importance = sum over tokens of |a * dL/da|, checked against retain_grad on every layer."""
    source = open_dense(dense_dir)
    model = source.dense_model()
    batches = [tokens(96, batch=2, length=16), tokens(96, batch=1, length=16) + 1]
    batches[1] %= 96
    got = neuron_importance(model, batches, [0, 2], 1, torch.Generator().manual_seed(0))

    expected = {0: torch.zeros(I), 2: torch.zeros(I)}
    for ids in batches:
        captured = {}
        hooks = [
            model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
                lambda m, args, i=i: captured.__setitem__(i, args[0])
            )
            for i in (0, 2)
        ]
        embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, labels=ids)
        for a in captured.values():
            a.retain_grad()
        out.loss.backward()
        for hook in hooks:
            hook.remove()
        for i, a in captured.items():
            expected[i] += (a * a.grad).abs().sum((0, 1))
    for i in (0, 2):
        torch.testing.assert_close(got[i][0][0], expected[i])


def test_select_neurons_sharing_inner_and_inter():
    importance = torch.tensor([[9.0, 8, 7, 1, 0, 0], [9, 0, 1, 8, 7, 0], [9, 0, 0, 1, 7, 8]])
    experts, shared = select_neurons(importance, 2, 0)
    assert experts.tolist() == [[0, 1], [0, 3], [0, 5]]  # Sharing-Inner: neuron 0 in every expert
    experts, shared = select_neurons(importance, 2, 1)
    assert shared.tolist() == [0]  # ranked high by every group -> always on
    assert experts.tolist() == [[1, 2], [3, 4], [4, 5]]


def test_gradient_upcycle_end_to_end(dense_dir, calibration_file, tmp_path):
    out = upcycle(
        dense_dir,
        tmp_path / "m",
        method="gradient",
        num_experts=4,
        top_k=2,
        shared_experts=1,
        calibration_data=calibration_file,
        router_init="centroids",
        progress=False,
    )
    config = json.load(open(os.path.join(out, "config.json")))
    size = I // 5
    # routed experts are padded to a multiple of 8 neurons with zeros (test_expert_width.py); the shared one is not
    assert config["moe_intermediate_size"] == 24 and config["shared_expert_intermediate_size"] == size
    assert config["routed_scaling_factor"] == pytest.approx((I - size) / (2 * size))
    tensors = read_tensors(out)
    dense = read_tensors(dense_dir)
    for layer in range(3):
        gate = dense[f"model.layers.{layer}.mlp.gate_proj.weight"]
        rows = row_index(gate)
        gate_up = tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        shared_gate = tensors[f"model.layers.{layer}.mlp.shared_expert.gate_proj.weight"]
        shared_rows = {rows[r.numpy().tobytes()] for r in shared_gate}
        assert len(shared_rows) == size
        for e in range(4):
            neurons = {rows[r.numpy().tobytes()] for r in gate_up[e, :size]}
            assert len(neurons) == size and not neurons & shared_rows  # real dense neurons, not the shared ones
            assert not gate_up[e, size:24].any()
        router = tensors[f"model.layers.{layer}.mlp.gate.weight"]
        torch.testing.assert_close(router.norm(dim=1), torch.ones(4))  # unit centroids of the FFN inputs
    assert logits_of(load_moe(out), tokens()).isfinite().all()
