"""The construction methods' defining properties: partitions (random, clustering), virtual groups and scaling
(granular), the re-initialized fraction (drop), exact equivalence where the math says so; the method registry."""

import json
import os

import pytest
import torch

from llama_moe.conversion import METHODS, upcycle
from llama_moe.conversion.methods import DenseFFN
from llama_moe.conversion.methods.clustering import balanced_kmeans
from llama_moe.conversion.options import UpcycleOptions
from tests.conversion.dense_fixtures import (
    load_dense,
    load_moe,
    logits_of,
    read_tensors,
    row_index,
    tokens,
    write_dense,
)

I, H = 96, 32


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {style: write_dense(root / style, style) for style in ("llama2", "llama3")}


def dense_ffn(dense_dir, layer):
    t = read_tensors(dense_dir)
    return [t[f"model.layers.{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")]


def source_neurons(gate_up_e, down_e, gate, up, down, down_scale=None):
    """For one expert: the dense neuron index of each of its neurons, checking gate, up and down agree (down
    columns exactly, or times `down_scale` for a method that scales its routed output)."""
    width = gate_up_e.shape[0] // 2
    gate_rows, up_rows = row_index(gate), row_index(up)
    down_cols = row_index(down.T.contiguous())
    found = []
    for j in range(width):
        n = gate_rows[gate_up_e[j].numpy().tobytes()]
        assert up_rows[gate_up_e[width + j].numpy().tobytes()] == n
        if down_scale is None:
            assert down_cols[down_e[:, j].contiguous().numpy().tobytes()] == n
        else:
            torch.testing.assert_close(down_e[:, j], down_scale * down[:, n])
        found.append(n)
    return found


def routed_down_scale(gate_up, down_e, gate, down) -> float:
    """The one factor between a layer's routed down columns and the dense ones (read off its first neuron)."""
    n = row_index(gate)[gate_up[0, 0].numpy().tobytes()]
    return float(down_e[0, :, 0] @ down[:, n] / down[:, n].pow(2).sum())


def assert_partition(out, dense_dir, num_layers, E, shared_groups=0, scaled_routed=False):
    tensors = read_tensors(out)
    for layer in range(num_layers):
        gate, up, down = dense_ffn(dense_dir, layer)
        gate_up = tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down_e = tensors[f"model.layers.{layer}.mlp.experts.down_proj"]
        width = I // (E + shared_groups)
        assert gate_up.shape == (E, 2 * width, H) and down_e.shape == (E, H, width)
        scale = routed_down_scale(gate_up, down_e, gate, down) if scaled_routed else None
        neurons = [n for e in range(E) for n in source_neurons(gate_up[e], down_e[e], gate, up, down, scale)]
        if shared_groups:
            prefix = f"model.layers.{layer}.mlp.shared_expert."
            shared_gate_up = torch.cat([tensors[prefix + "gate_proj.weight"], tensors[prefix + "up_proj.weight"]])
            neurons += source_neurons(shared_gate_up, tensors[prefix + "down_proj.weight"], gate, up, down)
        assert sorted(neurons) == list(range(I)), "every neuron exactly once"


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_random_is_an_equal_partition(dense_dirs, tmp_path, style):
    out = upcycle(dense_dirs[style], tmp_path / "m", method="random", num_experts=4, top_k=2, progress=False)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["moe_intermediate_size"] == I // 4 and config["routed_scaling_factor"] == 2.0
    assert_partition(out, dense_dirs[style], config["num_hidden_layers"], 4)
    assert logits_of(load_moe(out), tokens()).isfinite().all()
    # seeded: same seed same split, other seed another split
    again = upcycle(dense_dirs[style], tmp_path / "m2", method="random", num_experts=4, top_k=2, progress=False)
    other = upcycle(dense_dirs[style], tmp_path / "m3", method="random", num_experts=4, top_k=2, seed=1, progress=False)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(read_tensors(out)[key], read_tensors(again)[key])
    assert not torch.equal(read_tensors(out)[key], read_tensors(other)[key])


def test_random_with_shared_experts_and_all_experts_active_is_dense(dense_dirs, tmp_path):
    """E=k=4 routed + 2 shared groups: every neuron is used once; with a zero router every routed weight is 1/4,
    so routed scaling 4 makes the layer exactly the dense FFN."""
    out = upcycle(
        dense_dirs["llama2"],
        tmp_path / "m",
        method="random",
        num_experts=4,
        top_k=4,
        shared_experts=2,
        routed_scaling_factor=1.0,
        progress=False,
    )
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["shared_expert_intermediate_size"] == 2 * I // 6
    assert_partition(out, dense_dirs["llama2"], 3, 4, shared_groups=2)
    out4 = upcycle(
        dense_dirs["llama2"],
        tmp_path / "m4",
        method="random",
        num_experts=4,
        top_k=4,
        shared_experts=2,
        routed_scaling_factor=4.0,
        router_init="zeros",
        progress=False,
    )
    ids = tokens()
    torch.testing.assert_close(
        logits_of(load_moe(out4), ids), logits_of(load_dense(dense_dirs["llama2"]), ids), atol=1e-4, rtol=1e-4
    )


def test_clustering_is_an_equal_partition_and_centroids_init_router(dense_dirs, tmp_path):
    out = upcycle(
        dense_dirs["llama3"],
        tmp_path / "m",
        method="clustering",
        num_experts=4,
        top_k=2,
        router_init="centroids",
        progress=False,
    )
    assert_partition(out, dense_dirs["llama3"], 2, 4)
    tensors = read_tensors(out)
    router = tensors["model.layers.0.mlp.gate.weight"]
    gate_up = tensors["model.layers.0.mlp.experts.gate_up_proj"]
    up_rows = torch.nn.functional.normalize(gate_up[:, I // 4 :], dim=-1)  # [E, I/E, H]
    # each expert's rows are closer (cosine) to its own router row (centroid) than to the other centroids
    similarity = torch.einsum("enh,fh->enf", up_rows, torch.nn.functional.normalize(router, dim=-1)).mean(1)
    assert torch.equal(similarity.argmax(dim=1), torch.arange(4))
    assert logits_of(load_moe(out), tokens()).isfinite().all()


def test_balanced_kmeans_finds_planted_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    points = centers.repeat_interleave(10, 0) + 0.05 * torch.randn(40, 16, generator=generator)
    points = torch.nn.functional.normalize(points[torch.randperm(40, generator=generator)], dim=1)
    groups, _ = balanced_kmeans(points, 4, torch.Generator().manual_seed(1))
    assert groups.shape == (4, 10)
    labels = (points @ centers.T).argmax(1)
    for group in groups:
        assert len(set(labels[group].tolist())) == 1


def test_granular_virtual_groups_and_exact_mode(dense_dirs, tmp_path):
    E, G, k = 8, 4, 4
    out = upcycle(
        dense_dirs["llama2"],
        tmp_path / "m",
        method="granular",
        num_experts=E,
        top_k=k,
        granularity=G,
        granular_scaling="exact",
        progress=False,
    )
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["moe_intermediate_size"] == I // G and config["routed_scaling_factor"] == G
    assert config["norm_topk_prob"] is True
    tensors = read_tensors(out)
    for layer in range(3):
        gate, up, down = dense_ffn(dense_dirs["llama2"], layer)
        gate_up = tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down_e = tensors[f"model.layers.{layer}.mlp.experts.down_proj"]
        router = tensors[f"model.layers.{layer}.mlp.gate.weight"]
        w = I // G
        for e in range(E):
            shard = slice((e % G) * w, (e % G + 1) * w)  # expert e holds shard e % G (contiguous neurons)
            assert torch.equal(gate_up[e], torch.cat([gate[shard], up[shard]]))
            assert torch.equal(down_e[e], down[:, shard])
            assert torch.equal(router[e], router[(e // G) * G])  # one router row per virtual group
        assert not torch.equal(router[0], router[G])
    ids = tokens()
    moe = load_moe(out)
    torch.testing.assert_close(
        logits_of(moe, ids), logits_of(load_dense(dense_dirs["llama2"]), ids), atol=1e-4, rtol=1e-4
    )
    # top-k picks whole virtual groups: k/G groups, all G shards of each
    for load in moe.expert_load().values():
        per_group = load.view(E // G, G)
        assert torch.equal(per_group, per_group[:, :1].expand(-1, G))


def test_granular_paper_scaling(dense_dirs, tmp_path):
    E, G, k = 8, 2, 2
    out = upcycle(
        dense_dirs["llama3"], tmp_path / "m", method="granular", num_experts=E, top_k=k, granularity=G, progress=False
    )
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["norm_topk_prob"] is False and config["routed_scaling_factor"] == 1.0  # softmax-then-top-k
    gate, up, down = dense_ffn(dense_dirs["llama3"], 0)
    gate_up = read_tensors(out)["model.layers.0.mlp.experts.gate_up_proj"]
    scale = (E * G / k) ** (1 / 3)  # Megatron-Core: (expansion E/G) * G^2 / k, cube root for SwiGLU
    torch.testing.assert_close(gate_up[1, : I // G], gate[I // G :] * scale)
    assert logits_of(load_moe(out), tokens()).isfinite().all()


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_drop_reinitializes_the_fraction(dense_dirs, tmp_path, ratio):
    E = 4
    out = upcycle(
        dense_dirs["llama2"], tmp_path / "m", method="drop", num_experts=E, top_k=2, drop_ratio=ratio, progress=False
    )
    tensors = read_tensors(out)
    gate, up, down = dense_ffn(dense_dirs["llama2"], 1)
    gate_up = tensors["model.layers.1.mlp.experts.gate_up_proj"]
    down_e = tensors["model.layers.1.mlp.experts.down_proj"]
    subsets = []
    for e in range(E):
        changed = (gate_up[e, :I] != gate).any(1)
        assert torch.equal(changed, (gate_up[e, I:] != up).any(1))
        assert torch.equal(changed, (down_e[e] != down).any(0))
        assert int(changed.sum()) == round(ratio * I)
        subsets.append(changed)
        new = gate_up[e, :I][changed]
        assert abs(new.std().item() - gate.std().item()) < 0.25 * gate.std().item()
    assert len({tuple(s.tolist()) for s in subsets}) == E, "a different subset per expert"


def test_drop_ratio_zero_is_exact_copy(dense_dirs, tmp_path):
    out = upcycle(
        dense_dirs["llama3"], tmp_path / "m", method="drop", num_experts=4, top_k=2, drop_ratio=0.0, progress=False
    )
    ids = tokens()
    torch.testing.assert_close(
        logits_of(load_moe(out), ids), logits_of(load_dense(dense_dirs["llama3"]), ids), atol=1e-5, rtol=1e-5
    )


def test_every_method_follows_one_signature():
    generator = torch.Generator().manual_seed(0)
    ffn = DenseFFN(torch.randn(I, H), torch.randn(I, H), torch.randn(H, I), inputs=torch.randn(64, H))
    for name, method in METHODS.items():
        if name == "gradient":
            continue  # needs calibration text through the whole model (see its own test)
        options = UpcycleOptions(method=name, num_experts=4, top_k=2, granularity=2, router_std=0.02)
        init = method.build(ffn, options, generator, 0)
        E, two_width, hidden = init.gate_up.shape
        assert (E, hidden) == (4, H) and init.down.shape == (4, H, two_width // 2)
        assert init.router is None or init.router.shape == (4, H)
