"""Tests of the "dropless" experts kernel against the eager per-expert loop and transformers' grouped_mm.

Outputs and gradients (inputs, routing weights / router, gate_up_proj, down_proj) must agree; no timing here.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from llama_moe.modeling import (
    DroplessExpertsFunction,
    LlamaMoEExperts,
    LlamaMoEForCausalLM,
    LlamaMoESparseMoeBlock,
)
from llama_moe.modeling.dropless_moe import sort_slots_by_expert
from tests.conftest import tiny_moe_config

# (num_experts, top_k, hidden, expert width, tokens)
SHAPES = {
    "coarse-8x2": (8, 2, 32, 24, 40),
    "fine-64x8": (64, 8, 32, 8, 48),
    "top1-8x1": (8, 1, 32, 24, 40),
}
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}
BF16_REL_TOL = 3e-2


def _config(num_experts, top_k, hidden, width, **overrides):
    # Top-1 with renormalization gives every kept slot weight 1 (no router gradient to compare): softmax-then-top-k.
    overrides.setdefault("norm_topk_prob", top_k > 1)
    return tiny_moe_config(
        hidden_size=hidden,
        moe_intermediate_size=width,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        **overrides,
    )


def _init_(module, std=0.2):
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, std)
    return module


def _routing(num_tokens, num_experts, top_k, only_experts=None, dropped=0):
    """Random top-k routing; `only_experts` restricts the choice (the others get no token); `dropped` slots get
    the sentinel index `num_experts` and weight 0, as the capacity limit does."""
    logits_TE = torch.randn(num_tokens, num_experts)
    if only_experts is not None:
        mask = torch.full((num_experts,), float("-inf"))
        mask[list(only_experts)] = 0.0
        logits_TE = logits_TE + mask
    weights_TK, index_TK = torch.topk(logits_TE.softmax(-1), top_k, dim=-1)
    if dropped:
        flat = torch.randperm(num_tokens * top_k)[:dropped]
        index_TK.view(-1)[flat] = num_experts
        weights_TK.view(-1)[flat] = 0.0
    return index_TK, weights_TK


def _rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-12)).item()


def _assert_same(actual, expected, dtype, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if dtype == torch.bfloat16:
        assert _rel_err(actual, expected) < BF16_REL_TOL, f"{what}: relative error {_rel_err(actual, expected)}"
    else:
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


def _experts_run(experts, impl, hidden_TH, index_TK, weights_TK, seed_TH):
    """Output and gradients (input, routing weights, gate_up_proj, down_proj) of one implementation."""
    experts.config._experts_implementation = impl
    experts.zero_grad(set_to_none=True)
    hidden_TH = hidden_TH.detach().clone().requires_grad_()
    weights_TK = weights_TK.detach().clone().requires_grad_()
    out_TH = experts(hidden_TH, index_TK, weights_TK)
    (out_TH.float() * seed_TH).sum().backward()
    return {
        "output": out_TH.detach(),
        "grad_input": hidden_TH.grad,
        "grad_weights": weights_TK.grad,
        "grad_gate_up_proj": experts.gate_up_proj.grad,
        "grad_down_proj": experts.down_proj.grad,
    }


def _check_experts(shape, dtype, device="cpu", impls=("dropless", "grouped_mm"), act="silu", only=None, dropped=0):
    num_experts, top_k, hidden, width, tokens = shape
    config = _config(num_experts, top_k, hidden, width, hidden_act=act)
    experts = _init_(LlamaMoEExperts(config)).to(device=device, dtype=dtype)
    experts._is_expert_parallel = dropped > 0  # transformers' backends skip sentinel slots only in this mode
    index_TK, weights_TK = _routing(tokens, num_experts, top_k, only, dropped)
    hidden_TH = torch.randn(tokens, hidden)
    seed_TH = torch.randn(tokens, hidden, device=device)
    args = (hidden_TH.to(device, dtype), index_TK.to(device), weights_TK.to(device, dtype), seed_TH)
    expected = _experts_run(experts, "eager", *args)
    results = {impl: _experts_run(experts, impl, *args) for impl in impls}
    for impl, result in results.items():
        for name, value in result.items():
            _assert_same(value, expected[name], dtype, f"{impl} {name}")
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_experts_match_eager_and_grouped_mm(shape, dtype):
    _check_experts(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_experts_without_tokens_get_zero_gradients(dtype):
    num_experts = 8
    busy = [1, 2, 5]
    results = _check_experts((num_experts, 2, 32, 24, 30), dtype, only=busy, dropped=7)
    idle = [e for e in range(num_experts) if e not in busy]
    for impl in ("dropless",):
        assert torch.count_nonzero(results[impl]["grad_gate_up_proj"][idle]) == 0
        assert torch.count_nonzero(results[impl]["grad_down_proj"][idle]) == 0
        assert torch.count_nonzero(results[impl]["grad_gate_up_proj"][busy]) > 0


def test_dropped_slots_skip_experts():
    # Every slot dropped: the routed output and every gradient are exactly zero (eager has no graph to compare).
    experts = _init_(LlamaMoEExperts(_config(4, 2, 16, 8)))
    index_TK, weights_TK = _routing(6, 4, 2, dropped=12)
    result = _experts_run(experts, "dropless", torch.randn(6, 16), index_TK, weights_TK, torch.randn(6, 16))
    for name, value in result.items():
        assert value is not None and torch.count_nonzero(value) == 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [SHAPES["coarse-8x2"], SHAPES["fine-64x8"]], ids=["coarse-8x2", "fine-64x8"])
def test_grouped_gemm_backend(monkeypatch, shape, dtype):
    # The CUDA default (torch's grouped_mm for the expert GEMMs), checked here on CPU, with idle experts and drops.
    from llama_moe.modeling import dropless_moe

    monkeypatch.setattr(dropless_moe.settings, "gemm_backend", "grouped")
    num_experts = shape[0]
    results = _check_experts(shape, dtype, impls=("dropless",), only=range(num_experts // 2), dropped=5)
    assert torch.count_nonzero(results["dropless"]["grad_down_proj"][num_experts // 2 :]) == 0


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_non_silu_activation_uses_generic_backward(act):
    _check_experts((8, 2, 32, 24, 40), torch.float32, act=act)


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_decode_sizes(tokens):
    _check_experts((16, 4, 32, 16, tokens), torch.float32)


@pytest.mark.parametrize("short_row", [512, 0], ids=["products-and-sums", "gemv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,dropped", [(1, 0), (3, 2), (8, 5), (2, 8)])
def test_few_slots_inference_path_matches_eager(monkeypatch, tokens, dropped, dtype, short_row):
    # Decoding (no autograd, few slots) skips the sort and the autograd.Function: same outputs as eager, and as the
    # sorted path, under no_grad and inference_mode, with capacity-dropped (sentinel) slots (all of them for 2
    # tokens), for both ways of computing the down projection.
    from llama_moe.modeling import dropless_moe

    monkeypatch.setattr(dropless_moe.settings, "short_row", short_row)
    calls = []
    few_slots_forward = dropless_moe.few_slots_forward
    monkeypatch.setattr(dropless_moe, "few_slots_forward", lambda *a: calls.append(1) or few_slots_forward(*a))
    # cover several rows
    monkeypatch.setattr(dropless_moe.settings, "few_slots", max(dropless_moe.settings.few_slots, tokens * 4))
    num_experts = 16
    experts = _init_(LlamaMoEExperts(_config(num_experts, 4, 32, 16))).to(dtype)
    experts._is_expert_parallel = True
    index_TK, weights_TK = _routing(tokens, num_experts, 4, dropped=dropped)
    hidden_TH, weights_TK = torch.randn(tokens, 32, dtype=dtype), weights_TK.to(dtype)
    outputs = {}
    for impl, context in (("eager", torch.no_grad), ("dropless", torch.no_grad), ("dropless", torch.inference_mode)):
        experts.config._experts_implementation = impl
        with context():
            outputs[impl, context.__name__] = experts(hidden_TH, index_TK, weights_TK).clone()
    monkeypatch.setattr(dropless_moe.settings, "few_slots", 0)
    experts.config._experts_implementation = "dropless"
    with torch.no_grad():
        sorted_path = experts(hidden_TH, index_TK, weights_TK)
    assert len(calls) == 2
    expected = outputs["eager", "no_grad"]
    for (impl, context), value in outputs.items():
        _assert_same(value, expected, dtype, f"{impl} under {context}")
    _assert_same(sorted_path, expected, dtype, "sorted path")


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_expert_parallel_matches_one_thread_per_call(monkeypatch, mode):
    # CPU expert parallelism (experts spread over threads, single-threaded GEMMs) against the serial loop; the
    # worker threads must inherit grad / inference mode and leave the thread count as it was.
    from llama_moe.modeling import dropless_moe

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = {}
        for parallel in (False, True):
            monkeypatch.setattr(dropless_moe.settings, "expert_parallel", parallel)
            torch.manual_seed(0)
            if mode == "grad":
                results[parallel] = _check_experts(SHAPES["fine-64x8"], torch.float32, impls=("dropless",))["dropless"]
                continue
            experts = _init_(LlamaMoEExperts(_config(64, 8, 32, 8)))
            experts.config._experts_implementation = "dropless"
            index_TK, weights_TK = _routing(48, 64, 8)
            with getattr(torch, mode)():
                results[parallel] = {"output": experts(torch.randn(48, 32), index_TK, weights_TK).clone()}
            assert torch.get_num_threads() == 2
        for name, value in results[True].items():
            torch.testing.assert_close(value, results[False][name], rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(previous_threads)


def test_expert_parallel_choice(monkeypatch):
    # Automatic choice: small expert GEMMs always go to whole experts per thread; large ones only when the queue's
    # largest-first split leaves the threads within expert_parallel_max_imbalance of even; never with too few experts.
    from llama_moe.modeling import dropless_moe

    monkeypatch.setattr(dropless_moe.settings, "expert_parallel", None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu, large, small = torch.device("cpu"), 2e9, 1e8
    balanced, skewed = [545, 518, 501, 484, 516, 520, 493, 519], [3000, 300, 200, 200, 100, 100, 100, 96]
    assert dropless_moe._busiest_thread_rows(balanced, 2) == 2048
    assert dropless_moe._busiest_thread_rows(skewed, 2) == 3000  # one expert outweighs all the others together
    assert dropless_moe._expert_threads(cpu, balanced, large) == 2
    assert dropless_moe._expert_threads(cpu, skewed, large) == 1
    uneven_but_splittable = [1500, 400, 300, 300, 300, 300, 300, 200]  # 1500 + 300 against the other 1800
    assert dropless_moe._expert_threads(cpu, uneven_but_splittable, large) == 2
    assert dropless_moe._expert_threads(cpu, skewed, small) == 2
    assert dropless_moe._expert_threads(cpu, balanced[:7], small) == 1  # fewer than 4 experts per thread
    assert dropless_moe._expert_threads(torch.device("meta"), balanced, small) == 1  # CPU only
    monkeypatch.setattr(dropless_moe.settings, "expert_parallel", False)
    assert dropless_moe._expert_threads(cpu, balanced, small) == 1


def test_no_tokens():
    experts = _init_(LlamaMoEExperts(_config(4, 2, 16, 8)))
    experts.config._experts_implementation = "dropless"
    hidden_TH = torch.randn(0, 16, requires_grad=True)
    weights_TK = torch.rand(0, 2, requires_grad=True)
    out_TH = experts(hidden_TH, torch.zeros(0, 2, dtype=torch.long), weights_TK)
    assert out_TH.shape == (0, 16)
    out_TH.sum().backward()
    assert torch.count_nonzero(experts.gate_up_proj.grad) == 0


def test_deterministic():
    first = _check_experts((8, 2, 32, 24, 40), torch.float32, impls=("dropless",))["dropless"]
    torch.manual_seed(0)
    second = _check_experts((8, 2, 32, 24, 40), torch.float32, impls=("dropless",))["dropless"]
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_gradcheck_float64(act):
    num_experts, top_k, hidden, width, tokens = 4, 2, 5, 3, 6
    index_TK, weights_TK = _routing(tokens, num_experts, top_k, only_experts=[0, 1, 3], dropped=2)
    args = (
        torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True),
        index_TK,
        weights_TK.double().requires_grad_(),
        (0.5 * torch.randn(num_experts, 2 * width, hidden, dtype=torch.float64)).requires_grad_(),
        (0.5 * torch.randn(num_experts, hidden, width, dtype=torch.float64)).requires_grad_(),
        ACT2FN[act],
    )
    assert torch.autograd.gradcheck(DroplessExpertsFunction.apply, args)


def test_sort_slots_by_expert():
    index_TK = torch.tensor([[2, 0], [0, 4], [1, 2]])  # 4 = sentinel (dropped) with 4 experts
    order_S, token_S, counts_E = sort_slots_by_expert(index_TK, 4)
    assert counts_E.tolist() == [2, 1, 2, 0, 1]
    assert order_S.tolist() == [1, 2, 4, 0, 5, 3]
    assert token_S.tolist() == [0, 1, 2, 0, 2, 1]


# --- MoE block level -------------------------------------------------------------------------------------------


def _block_run(block, impl, hidden_BTH, seed_BTH):
    block.experts.config._experts_implementation = impl
    block.zero_grad(set_to_none=True)
    hidden_BTH = hidden_BTH.detach().clone().requires_grad_()
    out_BTH = block(hidden_BTH)
    (out_BTH.float() * seed_BTH).sum().backward()
    grads = {name: param.grad for name, param in block.named_parameters()}
    return {"output": out_BTH.detach(), "grad_input": hidden_BTH.grad, **grads}


def _check_block(config, dtype, tokens=24, device="cpu", impls=("dropless", "grouped_mm")):
    block = _init_(LlamaMoESparseMoeBlock(config)).to(device=device, dtype=dtype)
    hidden_BTH = torch.randn(2, tokens // 2, config.hidden_size).to(device, dtype)
    seed_BTH = torch.randn(hidden_BTH.shape, device=device)
    expected = _block_run(block, "eager", hidden_BTH, seed_BTH)
    assert expected["gate.weight"] is not None and expected["gate.weight"].abs().sum() > 0
    for impl in impls:
        for name, value in _block_run(block, impl, hidden_BTH, seed_BTH).items():
            _assert_same(value, expected[name], dtype, f"{impl} {name}")
    return block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_block_matches_eager(shape, capacity_factor, dtype):
    num_experts, top_k, hidden, width, tokens = shape
    config = _config(num_experts, top_k, hidden, width, capacity_factor=capacity_factor)
    block = _check_block(config, dtype, tokens=tokens)
    if capacity_factor == 0.5:
        assert int(block.last_dropped_slots) > 0  # the capacity limit really dropped slots


def test_block_with_shared_expert_and_mlp_router():
    config = _config(8, 2, 32, 16, shared_expert_intermediate_size=24, shared_expert_gate=True, router_type="mlp")
    _check_block(config, torch.float32)


def test_one_expert_top1_equals_dense_swiglu():
    # MegaBlocks' check: a one-expert top-1 MoE is a dense SwiGLU FFN.
    hidden, width = 32, 48
    block = _init_(LlamaMoESparseMoeBlock(_config(1, 1, hidden, width)))
    block.experts.config._experts_implementation = "dropless"
    gate_up = block.experts.gate_up_proj.detach()[0].clone().requires_grad_()
    down = block.experts.down_proj.detach()[0].clone().requires_grad_()
    x = torch.randn(2, 10, hidden, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    seed = torch.randn(2, 10, hidden)
    (block(x) * seed).sum().backward()
    gate, up = F.linear(x_ref, gate_up).chunk(2, dim=-1)
    dense = F.linear(F.silu(gate) * up, down)
    (dense * seed).sum().backward()
    torch.testing.assert_close(block(x).detach(), dense.detach(), **TOLERANCES[torch.float32])
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(block.experts.gate_up_proj.grad[0], gate_up.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(block.experts.down_proj.grad[0], down.grad, **TOLERANCES[torch.float32])


# --- whole models ----------------------------------------------------------------------------------------------


def _model_run(model, impl, input_ids):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    return out.logits.detach(), grads


def _check_model(model, vocab_size):
    input_ids = torch.randint(0, vocab_size, (2, 12))
    logits_ref, grads_ref = _model_run(model, "eager", input_ids)
    assert any("experts" in name for name in grads_ref)
    for impl in ("dropless", "grouped_mm"):
        logits, grads = _model_run(model, impl, input_ids)
        assert model.config._experts_implementation == impl
        _assert_same(logits, logits_ref, torch.float32, f"{impl} logits")
        assert grads.keys() == grads_ref.keys()
        for name in grads_ref:
            _assert_same(grads[name], grads_ref[name], torch.float32, f"{impl} grad {name}")


def test_llama_moe_model_implementations_agree():
    config = _config(8, 2, 64, 32, moe_layers=[1], capacity_factor=None)
    model = LlamaMoEForCausalLM(config)
    assert model.config._experts_implementation == "dropless"  # our kernel is the default
    _check_model(model, config.vocab_size)


def test_dropless_on_plain_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    _check_model(MixtralForCausalLM(config), config.vocab_size)


def test_settings_change_for_a_block():
    from llama_moe.modeling import dropless_moe

    assert dropless_moe.settings.few_slots == 8
    with dropless_moe.configured(few_slots=0, expert_parallel=False):
        assert dropless_moe.settings.few_slots == 0
    assert dropless_moe.settings.few_slots == 8 and dropless_moe.settings.expert_parallel is None
    with pytest.raises(AttributeError):
        with dropless_moe.configured(few_slot=0):
            pass


def test_unsupported_experts_layout_is_refused():
    experts = copy.deepcopy(_init_(LlamaMoEExperts(_config(4, 2, 16, 8))))
    experts.config._experts_implementation = "dropless"
    experts.has_bias = True
    with pytest.raises(NotImplementedError, match="grouped_mm"):
        experts(torch.randn(3, 16), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2))


# --- GPU -------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_gpu_experts_and_block_match_eager(shape, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_experts(shape, dtype, device="cuda")
    _check_experts(shape, dtype, device="cuda", only=[0, 1], dropped=5)
    num_experts, top_k, hidden, width, tokens = shape
    _check_block(_config(num_experts, top_k, hidden, width, capacity_factor=0.5), dtype, tokens, device="cuda")


def test_inference_mode_then_normal_forward_and_backward():
    """Scratch buffers made under inference_mode must not leak into later autograd forwards (regression)."""
    from llama_moe.modeling import LlamaMoEForCausalLM
    from tests.conftest import tiny_moe_config

    model = LlamaMoEForCausalLM(tiny_moe_config()).eval()
    ids = torch.randint(0, 128, (1, 16))
    with torch.inference_mode():
        expected = model(ids).logits.clone()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
    model.train()
    model(ids, labels=ids).loss.backward()
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(ids).logits, expected)
