"""LlamaMoEForCausalLM behaviour: Llama parity, routing options, losses, capacity, cache, checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from llama_moe.modeling import LlamaMoEConfig, LlamaMoEForCausalLM, LlamaMoESparseMoeBlock
from llama_moe.modeling.modeling_llama_moe import cv2_load_balancing_loss, router_z_loss
from tests.conftest import LLAMA3_ROPE, tiny_moe_config


def _ids(batch=2, length=12, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _copy_upcycled_from(dense: LlamaForCausalLM, moe_config: LlamaMoEConfig) -> LlamaMoEForCausalLM:
    """Every expert is the dense FFN: with renormalized top-k the MoE must compute what the dense model does."""
    moe = LlamaMoEForCausalLM(moe_config).eval()
    dense_state = dense.state_dict()
    moe_state = moe.state_dict()
    for name in moe_state:
        if name in dense_state:
            moe_state[name] = dense_state[name]
    for idx in moe_config.moe_layers:
        prefix = f"model.layers.{idx}.mlp."
        gate, up, down = (dense_state[prefix + f"{p}_proj.weight"] for p in ("gate", "up", "down"))
        experts = moe_config.num_local_experts
        moe_state[prefix + "experts.gate_up_proj"] = torch.cat([gate, up], 0).expand(experts, -1, -1).clone()
        moe_state[prefix + "experts.down_proj"] = down.expand(experts, -1, -1).clone()
    moe.load_state_dict(moe_state)
    return moe


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_copied_experts_reproduce_the_dense_llama(style):
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    if style == "llama3":
        common.update(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=dict(LLAMA3_ROPE))
    dense = LlamaForCausalLM(LlamaConfig(**common)).eval()
    moe = _copy_upcycled_from(dense, LlamaMoEConfig(**common, num_local_experts=8, num_experts_per_tok=2))
    ids = _ids(length=20)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    if style == "llama3":
        assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()


def test_router_logits_loss_and_aux_loss():
    model = LlamaMoEForCausalLM(tiny_moe_config(num_hidden_layers=3, moe_layers=[0, 2], router_aux_loss_coef=0.1))
    ids = _ids()
    plain = model(ids, labels=ids)
    out = model(ids, labels=ids, output_router_logits=True)
    assert plain.aux_loss is None and plain.router_logits is None
    assert isinstance(out.router_logits, tuple) and len(out.router_logits) == 2
    assert out.router_logits[0].shape == (ids.numel(), 4) and out.router_logits[0].dtype == torch.float32
    torch.testing.assert_close(out.loss, plain.loss + 0.1 * 2 * out.aux_loss)  # the coefficient counts per MoE layer
    # Switch loss is 1.0 for perfectly balanced routing and grows with imbalance; it is differentiable.
    assert out.aux_loss.item() >= 1.0 - 1e-4
    out.loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert isinstance(model.model.layers[1].mlp, LlamaMLP)


@pytest.mark.parametrize("aux_loss_type", ["switch", "cv2"])
def test_each_router_gets_the_whole_coefficient_however_many_layers(aux_loss_type):
    """Switch/Megatron: the balance term is coef x the sum of each layer's own loss, so a router's push does not
    shrink as layers are added (a mean over 30 layers gave each router 1/30 and the routing collapsed); `aux_loss`
    reports the mean over layers."""
    for layers in (1, 4):
        torch.manual_seed(0)
        model = LlamaMoEForCausalLM(
            tiny_moe_config(num_hidden_layers=layers, aux_loss_type=aux_loss_type, router_aux_loss_coef=0.5)
        )
        ids = _ids()
        out = model(ids, labels=ids, output_router_logits=True)
        per_layer = torch.stack([model.router_aux_loss((logits,)) for logits in out.router_logits])
        assert per_layer.numel() == layers
        torch.testing.assert_close(out.aux_loss, per_layer.mean())
        torch.testing.assert_close(out.loss - out.language_loss, 0.5 * per_layer.sum())


def test_aux_loss_excludes_padding():
    model = LlamaMoEForCausalLM(tiny_moe_config(aux_loss_type="switch"))
    ids = _ids(batch=2, length=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    out = model(ids, attention_mask=mask, output_router_logits=True)
    keep = mask.reshape(-1).bool()
    expected = model.router_aux_loss(tuple(logits[keep] for logits in out.router_logits))
    torch.testing.assert_close(out.aux_loss, expected)


def test_switch_loss_is_per_layer():
    """Two layers collapsed onto different experts are each unbalanced; summing counts over layers first (as
    transformers' load_balancing_loss_func does) would call them balanced."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from llama_moe.modeling.modeling_llama_moe import switch_load_balancing_loss

    E, k, T = 4, 2, 16
    collapsed = []
    for layer in range(2):
        logits = torch.zeros(T, E)
        logits[:, 2 * layer : 2 * layer + 2] = 5.0  # layer 0 uses experts 0-1, layer 1 uses experts 2-3
        collapsed.append(logits.requires_grad_(True))
    together = load_balancing_loss_func(tuple(collapsed), E, k)
    per_layer = switch_load_balancing_loss(tuple(collapsed), E, k)
    assert together.item() == pytest.approx(k, rel=0.02)  # looks balanced
    assert per_layer.item() > 1.9 * k  # each layer sends every slot to half of the experts
    one = switch_load_balancing_loss((collapsed[0],), E, k)
    torch.testing.assert_close(one, load_balancing_loss_func((collapsed[0],), E, k))
    per_layer.backward()
    # The gradient pushes the crowded experts' logits down in each layer.
    assert (collapsed[0].grad[:, :2] > 0).all() and (collapsed[1].grad[:, 2:] > 0).all()


def test_router_temperature_is_a_rescaling_of_the_router():
    """Logits / T with rows W give exactly the routing of rows W / T at temperature 1 (what exports write)."""
    hot = LlamaMoEForCausalLM(tiny_moe_config(router_temperature=50.0)).eval()
    cold = LlamaMoEForCausalLM(tiny_moe_config()).eval()
    cold.load_state_dict(hot.state_dict())
    with torch.no_grad():
        for layer in cold.model.layers:
            layer.mlp.gate.weight /= 50.0
    ids = _ids()
    out_hot, out_cold = hot(ids, output_router_logits=True), cold(ids, output_router_logits=True)
    torch.testing.assert_close(out_hot.logits, out_cold.logits)
    torch.testing.assert_close(out_hot.router_logits[0], out_cold.router_logits[0])
    with pytest.raises(ValueError, match="router_temperature must be > 0"):
        tiny_moe_config(router_temperature=0.0)


def test_cv2_and_z_loss():
    model = LlamaMoEForCausalLM(tiny_moe_config(aux_loss_type="cv2", router_z_loss_coef=0.001))
    ids = _ids()
    out = model(ids, labels=ids, output_router_logits=True)
    plain = model(ids, labels=ids, output_router_logits=False)
    layers = len(model.config.moe_layers)
    torch.testing.assert_close(out.loss, plain.loss + layers * (0.01 * out.aux_loss + 0.001 * out.z_loss))
    assert out.z_loss.item() > 0
    # Perfectly balanced routing has zero coefficient of variation.
    balanced = torch.zeros(8, 4)
    balanced[torch.arange(8), torch.arange(8) % 4] = 5.0
    assert cv2_load_balancing_loss((balanced,), 4, 1, True).item() == pytest.approx(0.0, abs=1e-6)
    skewed = torch.zeros(8, 4)
    skewed[:, 0] = 5.0
    assert cv2_load_balancing_loss((skewed,), 4, 1, True).item() > 1.0
    torch.testing.assert_close(router_z_loss((torch.zeros(3, 4),)), torch.log(torch.tensor(4.0)) ** 2)


def test_norm_topk_prob_and_routed_scaling():
    x = torch.randn(10, 64)
    raw = LlamaMoESparseMoeBlock(tiny_moe_config(norm_topk_prob=False))
    torch.nn.init.normal_(raw.gate.weight, std=0.05)
    logits, weights, index = raw.gate(x)
    torch.testing.assert_close(weights, F.softmax(logits, -1).gather(1, index))  # softmax, then top-k
    assert (weights.sum(-1) < 1).all()

    renormalized = LlamaMoESparseMoeBlock(tiny_moe_config())
    renormalized.load_state_dict(raw.state_dict())
    _, weights, index = renormalized.gate(x)
    torch.testing.assert_close(weights, F.softmax(logits.gather(1, index), -1))  # softmax over top-k logits

    scaled = LlamaMoESparseMoeBlock(tiny_moe_config(routed_scaling_factor=2.5))
    torch.nn.init.normal_(scaled.gate.weight, std=0.05)  # a bare block's parameters start uninitialized
    torch.nn.init.normal_(scaled.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(scaled.experts.down_proj, std=0.1)
    renormalized.load_state_dict(scaled.state_dict())
    torch.testing.assert_close(scaled(x[None]), 2.5 * renormalized(x[None]))


def test_shared_expert_with_gate():
    block = LlamaMoESparseMoeBlock(tiny_moe_config(shared_expert_intermediate_size=16, shared_expert_gate=True))
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.1)
    x = torch.randn(1, 6, 64)
    x_TH = x[0]
    _, weights, index = block.gate(x_TH)
    routed = block.experts(x_TH, index, weights)
    shared = torch.sigmoid(block.shared_expert_gate(x_TH)) * block.shared_expert(x_TH)
    torch.testing.assert_close(block(x)[0], routed + shared)


def test_mlp_router_and_noisy_gate():
    model = LlamaMoEForCausalLM(tiny_moe_config(router_type="mlp", router_noise="noisy_topk"))
    gate = model.model.layers[0].mlp.gate
    assert gate.out_weight.shape == (4, 4) and gate.noise_weight.shape == (4, 64)
    ids = _ids()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits)  # no noise in eval
        x = torch.randn(5, 64)
        expected = F.linear(torch.tanh(F.linear(x, gate.weight)), gate.out_weight)
        torch.testing.assert_close(gate(x)[0], expected)
    model.train()
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert gate.noise_weight.grad is not None and gate.out_weight.grad.abs().sum() > 0


def test_jitter_noise_only_in_training():
    model = LlamaMoEForCausalLM(tiny_moe_config(router_noise="jitter", router_jitter_noise=0.5))
    ids = _ids()
    gate = model.model.layers[0].mlp.gate  # the router owns its noise: it multiplies its own input in training
    x = torch.randn(8, 64)
    model.train()
    assert not torch.equal(gate(x)[0], gate(x)[0])
    model.eval()
    torch.testing.assert_close(gate(x)[0], F.linear(x, gate.weight))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits)


def test_capacity_factor_drops_slots_and_large_capacity_is_dropless():
    ids = _ids(batch=4, length=16)
    tight = LlamaMoEForCausalLM(tiny_moe_config(capacity_factor=0.5)).eval()
    loose = LlamaMoEForCausalLM(tiny_moe_config(capacity_factor=100.0)).eval()
    dropless = LlamaMoEForCausalLM(tiny_moe_config()).eval()
    loose.load_state_dict(tight.state_dict())
    dropless.load_state_dict(tight.state_dict())
    with torch.no_grad():
        tight_logits = tight(ids).logits
        torch.testing.assert_close(loose(ids).logits, dropless(ids).logits)
    capacity = -(-0.5 * ids.numel() * 2 // 4)
    for layer, load in tight.expert_load().items():
        assert (load <= capacity).all()
        assert int(load.sum()) + tight.dropped_slots()[layer] == ids.numel() * 2
    assert sum(tight.dropped_slots().values()) > 0
    assert all(v == 0 for v in loose.dropped_slots().values())
    assert torch.isfinite(tight_logits).all()
    for impl in ("eager", "grouped_mm"):
        tight.set_experts_implementation(impl)
        with torch.no_grad():
            torch.testing.assert_close(tight(ids).logits, tight_logits, atol=1e-5, rtol=1e-5)


def test_expert_load_counts_every_slot():
    model = LlamaMoEForCausalLM(tiny_moe_config(num_experts_per_tok=3))
    ids = _ids()
    model(ids)
    load = model.expert_load()
    assert sorted(load) == [0, 1]
    assert all(int(counts.sum()) == ids.numel() * 3 for counts in load.values())


def test_generate_same_tokens_with_and_without_cache():
    model = LlamaMoEForCausalLM(tiny_moe_config()).eval()
    prompt = _ids(batch=1, length=5)
    with_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    without_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 13)
    assert torch.equal(with_cache, without_cache)
    # The v4 name of the cache argument still works, with transformers' own deprecation warning.
    out = model(prompt, use_cache=True)
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated.*Use `cache` instead"):
        step = model(prompt[:, :1], past_key_values=out.cache)
    assert step.logits.shape == (1, 1, 128)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = _ids()
    reference = LlamaMoEForCausalLM(tiny_moe_config())
    checkpointed = LlamaMoEForCausalLM(tiny_moe_config())
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.gradient_checkpointing_enable()
    reference.train()
    checkpointed.train()
    for model in (reference, checkpointed):
        model(ids, labels=ids, output_router_logits=True).loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_padding_free_packed_batch_matches_separate_sequences():
    model = LlamaMoEForCausalLM(tiny_moe_config()).eval()
    first, second = _ids(batch=1, length=7, seed=1), _ids(batch=1, length=5, seed=2)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(packed_logits[:, :7], model(first).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_logits[:, 7:], model(second).logits, atol=1e-5, rtol=1e-5)


def test_bfloat16_model_routes_in_float32():
    model = LlamaMoEForCausalLM(tiny_moe_config()).to(torch.bfloat16)
    out = model(_ids(), output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)
