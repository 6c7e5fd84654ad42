"""LLaMA-MoE v1 import: a tiny v1-style checkpoint, run by a re-implementation of v1's MoE forward, gives the same
eval-mode logits as our imported model; v1 options without an equivalent are refused, each named."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llama_moe.conversion.llama_moe_v1 import import_llama_moe_v1, llama_moe_v1_config
from llama_moe.modeling import LlamaMoEForCausalLM


class V1MoEReference(nn.Module):
    """LLaMA-MoE v1's `LinearGLUMoELayer` in eval mode, after smoe/modules/moe (TopKBalancedNoisyGate +
    UniversalCalculator + LinearGLUExperts): top-k of the gate logits, softmax over those k logits, each selected
    SwiGLU expert's output times its score times score_scale_factor, summed. Noise is training-only."""

    def __init__(self, weights: dict, layer: int, num_experts: int, num_selects: int, gate_network: str, scale: float):
        super().__init__()
        prefix = f"model.layers.{layer}.mlp"
        if gate_network == "mlp":
            self.gate_network = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Tanh(), nn.Linear(1, 1, bias=False))
            self.gate_network[0].weight = nn.Parameter(weights[f"{prefix}.gate.gate_network.0.weight"])
            self.gate_network[2].weight = nn.Parameter(weights[f"{prefix}.gate.gate_network.2.weight"])
        else:
            self.gate_network = nn.Linear(1, 1, bias=False)
            self.gate_network.weight = nn.Parameter(weights[f"{prefix}.gate.gate_network.weight"])
        experts = f"{prefix}.calculator.experts"
        self.w_gate = [weights[f"{experts}.weight_gate.{j}"] for j in range(num_experts)]
        self.w_up = [weights[f"{experts}.weight_up.{j}"] for j in range(num_experts)]
        self.w_down = [weights[f"{experts}.weight_down.{j}"] for j in range(num_experts)]
        self.num_experts, self.num_selects, self.scale = num_experts, num_selects, scale

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate_network(x)
        top_logits, top_indices = logits.topk(min(self.num_selects + 1, self.num_experts), dim=1)
        top_k_indices = top_indices[:, : self.num_selects]
        top_k_scores = torch.softmax(top_logits[:, : self.num_selects], dim=1)
        # UniversalCalculator: regroup the (token, slot) pairs by expert, run each expert once, weight, add.
        indices, scores = top_k_indices.flatten(), top_k_scores.flatten()
        batch_indices = torch.arange(x.shape[0]).repeat_interleave(self.num_selects)
        _, order = indices.sort(0)
        sorted_scores, sorted_batch = scores[order], batch_indices[order]
        split_x = torch.split(x[sorted_batch], indices.bincount(minlength=self.num_experts).tolist(), dim=0)
        outputs = []
        for j, xj in enumerate(split_x):
            if xj.shape[0]:
                hidden = nn.functional.silu(xj @ self.w_gate[j].T) * (xj @ self.w_up[j].T)
                outputs.append(hidden @ self.w_down[j].T)
        out = torch.cat(outputs) * (sorted_scores[:, None] * self.scale)
        return torch.zeros_like(x).index_add(0, sorted_batch, out).reshape(shape)


def _v1_checkpoint(path, *, gate_network, size_experts, score_scale_factor, gate_add_noise, bin_file=False, **extra):
    num_layers, num_experts, hidden = len(size_experts), len(size_experts[0]), 64
    config = dict(
        architectures=["LlamaMoEForCausalLM"],
        model_type="llama_moe",
        auto_map={"AutoConfig": "configuration_llama_moe.LlamaMoEConfig"},
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=256,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        pretraining_tp=1,
        tie_word_embeddings=False,
        rope_scaling=None,
        torch_dtype="float32",
        num_experts=num_experts,
        num_selects=2,
        size_experts=size_experts,
        gate_type="TopKBalancedNoisyGate",
        gate_network=gate_network,
        gate_use_softmax=True,
        gate_use_balance=True,
        gate_balance_loss_weight=0.01,
        gate_add_noise=gate_add_noise,
        gate_noise_epsilon=0.01,
        calculator_type="UniversalCalculator",
        multiply_gate_scores=True,
        score_scale_factor=score_scale_factor,
        add_weight_norm=False,
        drop_tokens=True,
        dropped_padding="zero",
        capacity_factor=1.25,
    )
    config.update(extra)

    def randn(*shape, std=0.05):
        return torch.randn(*shape) * std

    weights = {
        "model.embed_tokens.weight": randn(128, hidden, std=1.0),
        "model.norm.weight": 1.0 + randn(hidden),
        "lm_head.weight": randn(128, hidden),
    }
    for layer in range(num_layers):
        p = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[f"{p}.self_attn.{proj}.weight"] = randn(hidden, hidden)
        weights[f"{p}.self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
        weights[f"{p}.input_layernorm.weight"] = 1.0 + randn(hidden)
        weights[f"{p}.post_attention_layernorm.weight"] = 1.0 + randn(hidden)
        # Decisive routing (large gate weights) so that float rounding cannot flip a top-k choice.
        if gate_network == "mlp":
            weights[f"{p}.mlp.gate.gate_network.0.weight"] = randn(num_experts, hidden, std=1.0)
            weights[f"{p}.mlp.gate.gate_network.2.weight"] = randn(num_experts, num_experts, std=2.0)
        else:
            weights[f"{p}.mlp.gate.gate_network.weight"] = randn(num_experts, hidden, std=1.0)
        weights[f"{p}.mlp.gate.weight_noise.weight"] = randn(num_experts, hidden)
        for j, size in enumerate(size_experts[layer]):
            weights[f"{p}.mlp.calculator.experts.weight_gate.{j}"] = randn(size, hidden, std=0.2)
            weights[f"{p}.mlp.calculator.experts.weight_up.{j}"] = randn(size, hidden, std=0.2)
            weights[f"{p}.mlp.calculator.experts.weight_down.{j}"] = randn(hidden, size, std=0.2)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    if bin_file:  # some releases ship pickled .bin files: read back with weights_only=True
        torch.save(weights, path / "pytorch_model.bin")
    else:
        save_file(weights, str(path / "model.safetensors"))
    return config, weights


def _v1_reference_model(config, weights):
    """v1 = a Llama decoder whose MLPs are v1 MoE layers: transformers' Llama with the MLPs swapped."""
    llama_config = LlamaConfig(
        **{
            k: config[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "rms_norm_eps",
                "tie_word_embeddings",
            )
        },
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            **(
                {"rope_type": config["rope_scaling"]["type"], "factor": config["rope_scaling"]["factor"]}
                if config["rope_scaling"]
                else {}
            ),
        },
    )
    model = LlamaForCausalLM(llama_config).eval()
    dense = {k: v for k, v in weights.items() if ".mlp." not in k and "inv_freq" not in k}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing)
    scales = config["score_scale_factor"]
    for layer in range(config["num_hidden_layers"]):
        scale = scales[layer] if isinstance(scales, list) else scales
        model.model.layers[layer].mlp = V1MoEReference(
            weights, layer, config["num_experts"], config["num_selects"], config["gate_network"], scale
        )
    return model


V1_CASES = {
    # The released LLaMA-MoE-v1 recipe: mlp gate, equal expert sizes, scale factor, learned noise.
    "released_recipe": dict(
        gate_network="mlp", size_experts=[[32] * 4] * 2, score_scale_factor=2.0, gate_add_noise=True
    ),
    # Linear gate, unequal expert sizes (zero-padded), per-layer scale factors, linear RoPE scaling, .bin file.
    "uneven_experts": dict(
        gate_network="linear",
        size_experts=[[40, 24, 32, 32], [32] * 4],
        score_scale_factor=[1.5, 3.0],
        gate_add_noise=False,
        bin_file=True,
        rope_scaling={"type": "linear", "factor": 2.0},
    ),
}


@pytest.mark.parametrize("case", list(V1_CASES))
def test_v1_import_gives_the_v1_logits(tmp_path, case):
    config, weights = _v1_checkpoint(tmp_path / "v1", **V1_CASES[case])
    out = tmp_path / "ours"
    import_llama_moe_v1(tmp_path / "v1", out)

    assert (out / "modeling_llama_moe.py").is_file() and (out / "tokenizer_config.json").is_file()
    ours = LlamaMoEForCausalLM.from_pretrained(out).eval()
    c = ours.config
    assert (c.router_type, c.norm_topk_prob, c.aux_loss_type) == (config["gate_network"], True, "cv2")
    assert c.router_noise == ("noisy_topk" if config["gate_add_noise"] else "none")
    reference = _v1_reference_model(config, weights)

    input_ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        expected = reference(input_ids).logits
        got = ours(input_ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # The check has teeth: the MoE layers move these logits (v1 without its score scale gives others).
    for layer in reference.model.layers:
        layer.mlp.scale = 1.0
    with torch.no_grad():
        unscaled = reference(input_ids).logits
    assert (unscaled - expected).abs().max() > 1e-3


def test_v1_import_maps_the_config_and_padding(tmp_path):
    config, _ = _v1_checkpoint(tmp_path / "v1", **V1_CASES["uneven_experts"])
    ours, fold = llama_moe_v1_config(config)
    assert ours.moe_intermediate_size == 40 and fold == [1.5, 3.0] and ours.routed_scaling_factor == 1.0
    assert ours.rope_parameters["rope_type"] == "linear" and ours.rope_parameters["factor"] == 2.0
    same_scale, fold = llama_moe_v1_config({**config, "score_scale_factor": [4.0, 4.0]})
    assert same_scale.routed_scaling_factor == 4.0 and fold == [1.0, 1.0]
    import_llama_moe_v1(tmp_path / "v1", tmp_path / "ours")
    model = LlamaMoEForCausalLM.from_pretrained(tmp_path / "ours")
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj  # expert 1 has 24 of 40 neurons
    assert torch.all(gate_up[1, 24:40] == 0) and torch.all(gate_up[1, 64:] == 0)
    assert torch.all(model.model.layers[0].mlp.experts.down_proj[1, :, 24:] == 0)


def test_v1_options_without_equivalent_are_refused_together(tmp_path):
    config, _ = _v1_checkpoint(tmp_path / "v1", **V1_CASES["released_recipe"])
    bad = {
        **config,
        "gate_use_softmax": False,
        "multiply_gate_scores": False,
        "gate_type": "SwitchBalancedGate",
        "add_weight_norm": True,
    }
    (tmp_path / "v1" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError) as error:
        import_llama_moe_v1(tmp_path / "v1", tmp_path / "ours")
    for field in ("gate_use_softmax", "multiply_gate_scores", "gate_type", "add_weight_norm"):
        assert field in str(error.value)
    assert not (tmp_path / "ours").exists()
    with pytest.raises(ValueError, match="not a LLaMA-MoE v1 checkpoint"):
        (tmp_path / "v1" / "config.json").write_text(json.dumps({"model_type": "llama_moe", "num_local_experts": 4}))
        import_llama_moe_v1(tmp_path / "v1", tmp_path / "ours")


def test_v1_import_straight_to_mixtral_when_it_fits(tmp_path):
    from transformers import MixtralForCausalLM

    config, weights = _v1_checkpoint(tmp_path / "v1", **V1_CASES["uneven_experts"])
    import_llama_moe_v1(tmp_path / "v1", tmp_path / "mixtral", format_name="mixtral")
    mixtral, info = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    input_ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        expected = _v1_reference_model(config, weights)(input_ids).logits
        got = mixtral.eval()(input_ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)

    # The released recipe uses the Linear-Tanh-Linear gate, which Mixtral cannot express: refused up front.
    _v1_checkpoint(tmp_path / "v1_mlp", **V1_CASES["released_recipe"])
    with pytest.raises(ValueError, match="router_type='mlp'.*\n.*noisy_topk"):
        import_llama_moe_v1(tmp_path / "v1_mlp", tmp_path / "refused", format_name="mixtral")
    assert not (tmp_path / "refused").exists()
