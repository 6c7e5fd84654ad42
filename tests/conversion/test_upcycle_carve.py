"""`--method carve` and fitted routers on a tiny Llama with a word tokenizer: every neuron in exactly one expert
(shared or routed), the dense FFN back when every expert is on, a fitted router that ranks experts by their
contribution far better than chance, the card and exports, and bad input refused before any work."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llama_moe.conversion import upcycle
from llama_moe.conversion.calibration import LayerwiseCalibration, calibration_blocks, corpus_text
from llama_moe.conversion.reader import open_dense
from llama_moe.conversion.router_fit import expert_output_norms
from tests.conversion.dense_fixtures import load_dense, load_moe, logits_of, read_tensors, tokens, write_dense
from tests.conversion.test_upcycle_methods import assert_partition

I = 96


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A Llama-3-style tiny model (GQA, tied) with a word tokenizer over the embedded corpus's commonest words."""
    folder = tmp_path_factory.mktemp("dense") / "llama3"
    write_dense(folder, "llama3", num_hidden_layers=3)
    words = corpus_text(100_000).split()
    common = sorted(set(words), key=words.count, reverse=True)[:95]
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(common)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


def carve(dense_dir, out, **options):
    options = {"method": "carve", "calibration_tokens": 2048, "progress": False, **options}
    return upcycle(dense_dir, out, **options)


@pytest.mark.parametrize("shared", [0, 2])
def test_carve_covers_every_neuron_once(dense_dir, tmp_path, shared):
    out = carve(dense_dir, tmp_path / "m", num_experts=4, top_k=2, shared_experts=shared)
    config = json.load(open(os.path.join(out, "config.json")))
    width = I // (4 + shared)
    assert config["moe_intermediate_size"] == width
    assert config["shared_expert_intermediate_size"] == shared * width
    assert config["routed_scaling_factor"] == 2.0 and config["norm_topk_prob"] is True
    assert_partition(out, dense_dir, 3, 4, shared_groups=shared)
    assert logits_of(load_moe(out), tokens()).isfinite().all()


def test_carve_fitted_output_scale_scales_each_layer_routed_output_by_one_factor(dense_dir, tmp_path):
    out = carve(dense_dir, tmp_path / "m", num_experts=4, top_k=2, shared_experts=2, output_scale="fit")
    assert_partition(out, dense_dir, 3, 4, shared_groups=2, scaled_routed=True)
    assert "output_scale" in open(os.path.join(out, "README.md")).read()
    with pytest.raises(ValueError, match="output_scale|output-scale"):
        upcycle(dense_dir, tmp_path / "r", method="random", num_experts=4, top_k=2, output_scale="fit")


def test_carve_shared_expert_size_in_neurons(dense_dir, tmp_path):
    out = carve(dense_dir, tmp_path / "m", num_experts=4, top_k=2, shared_expert_size=20)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["moe_intermediate_size"] == 16  # (96 - 20) / 4 = 19, rounded down to a multiple of 8
    assert config["shared_expert_intermediate_size"] == 96 - 4 * 16  # the rest, so every neuron is used once
    tensors = read_tensors(out)
    assert tensors["model.layers.0.mlp.shared_expert.gate_proj.weight"].shape == (32, 32)


def test_carve_with_every_expert_on_is_the_dense_model(dense_dir, tmp_path):
    """top-k = E and equal weights (zero router): shared + all routed experts add up to the dense FFN."""
    out = carve(dense_dir, tmp_path / "m", num_experts=4, top_k=4, shared_experts=2, router_init="zeros")
    ids = tokens()
    torch.testing.assert_close(
        logits_of(load_moe(out), ids), logits_of(load_dense(dense_dir), ids), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("method", ["carve", "random"])
def test_fitted_router_ranks_experts_by_contribution(dense_dir, tmp_path, method):
    """On calibration inputs, the expert with the largest router logit is the expert with the largest output far
    more often than chance (1/E), and the logits correlate with the output norms."""
    E = 4
    out = upcycle(
        dense_dir,
        tmp_path / "m",
        method=method,
        num_experts=E,
        top_k=1,
        router_init="fit",
        calibration_tokens=2048,
        progress=False,
    )
    tensors = read_tensors(out)
    source = open_dense(dense_dir)
    blocks = calibration_blocks(source.load_tokenizer(), corpus_text(2048 * 8), 2048)
    calibration = LayerwiseCalibration(source, blocks)
    x_TH = calibration.ffn_inputs(0)  # layer 0 sees the dense inputs: no earlier layer was replaced
    prefix = "model.layers.0.mlp."
    norms_TE = expert_output_norms(
        tensors[prefix + "experts.gate_up_proj"], tensors[prefix + "experts.down_proj"], x_TH
    )
    logits_TE = x_TH @ tensors[prefix + "gate.weight"].float().T
    agreement = (logits_TE.argmax(1) == norms_TE.argmax(1)).float().mean().item()
    assert agreement > 2.0 / E
    centered = lambda t: t - t.mean(1, keepdim=True)  # noqa: E731
    correlation = torch.nn.functional.cosine_similarity(centered(logits_TE), centered(norms_TE), dim=1).mean()
    assert correlation > 0.5


def test_fitted_router_exports_fold_the_temperature(dense_dir, tmp_path):
    from transformers import MixtralForCausalLM

    out = upcycle(
        dense_dir,
        tmp_path / "m",
        method="random",
        num_experts=4,
        top_k=2,
        router_init="fit",
        calibration_tokens=2048,
        progress=False,
    )
    assert json.load(open(os.path.join(out, "config.json")))["router_temperature"] == 100.0
    mixtral = upcycle(
        dense_dir,
        tmp_path / "x",
        method="random",
        num_experts=4,
        top_k=2,
        router_init="fit",
        calibration_tokens=2048,
        format="mixtral",
        progress=False,
    )
    ids = tokens()
    expected = logits_of(load_moe(out), ids)
    torch.testing.assert_close(
        logits_of(MixtralForCausalLM.from_pretrained(mixtral).eval(), ids), expected, atol=1e-4, rtol=1e-4
    )


def test_carve_card_verify_and_exports(dense_dir, tmp_path):
    from llama_moe.conversion.options import UpcycleOptions
    from llama_moe.conversion.pipeline import run_upcycle

    options = UpcycleOptions.from_kwargs(
        method="carve", num_experts=4, top_k=2, shared_experts=2, calibration_tokens=2048
    )
    result = run_upcycle(dense_dir, tmp_path / "m", options, verify=True, progress=False)
    assert result.verify["max_abs_logit_diff"] > 0 and result.verify["moe_perplexity"] > 0
    card = open(os.path.join(result.path, "README.md")).read()
    assert "`carve`" in card and "router | init fit" in card and "calibration_tokens=2048" in card
    assert "embedded" in card and "generated (text sampled" in card  # where the calibration text came from
    assert "github.com" not in card  # links only to what exists
    qwen = upcycle(
        dense_dir,
        tmp_path / "q",
        method="carve",
        num_experts=4,
        top_k=2,
        shared_experts=2,
        calibration_tokens=2048,
        format="qwen2_moe",
        progress=False,
    )
    assert json.load(open(os.path.join(qwen, "config.json")))["shared_expert_intermediate_size"] == 32
    with pytest.raises(ValueError, match="no shared expert"):
        carve(dense_dir, tmp_path / "x", num_experts=4, top_k=2, shared_experts=2, format="mixtral")


def test_carve_refuses_bad_input_before_work(dense_dir, tmp_path):
    def refused(match, **options):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            carve(dense_dir, tmp_path / "out", **options)
        assert not (tmp_path / "out").exists()

    refused(r"--calibration-data .*missing.txt does not exist", calibration_data=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    refused(r"holds no text", calibration_data=str(empty))
    refused(r"cannot split the FFN's 96 neurons into 8 experts plus 90 shared", num_experts=8, shared_experts=90)
    refused(r"--calibration-tokens must be >= 256", calibration_tokens=100)
    refused(r"--shared-expert-size 200 does not fit the FFN's 96 neurons", shared_expert_size=200)
    refused(r"not both", shared_expert_size=8, shared_experts=1)
    refused(
        r"--router-init fit needs --method random, clustering, gradient, drop or carve",
        method="copy",
        router_init="fit",
    )
