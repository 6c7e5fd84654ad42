"""torch.compile(fullgraph=True) with the default "dropless" kernel: forward, training and static-cache generation
give what the uncompiled model gives, for our model and for native Mixtral using "dropless"."""

import pytest
import torch

from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import tiny_moe_config

pytestmark = pytest.mark.slow  # each test compiles a model (10-40 s on 2 cores)


def fresh(config, seed=0):
    torch.manual_seed(seed)
    return LlamaMoEForCausalLM(config)


def ids(batch=2, length=12, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_model_declares_fullgraph_compile():
    assert LlamaMoEForCausalLM._can_compile_fullgraph


@pytest.mark.parametrize(
    "layout",
    [dict(), dict(moe_layers=[1], shared_expert_intermediate_size=16, capacity_factor=1.0)],
    ids=["all MoE", "dense layer, shared expert, capacity"],
)
def test_compiled_forward_and_gradients_match_eager_mode(layout):
    torch._dynamo.reset()
    config = tiny_moe_config(output_router_logits=True, **layout)
    model, reference = fresh(config), fresh(config)
    assert model.config._experts_implementation == "dropless"
    batch = ids()
    with torch.no_grad():
        # transformers installs its output-recording hooks (router logits) at the first call, under a lock that
        # dynamo cannot trace: the same for every model that records outputs, so make that call outside the graph
        model(ids(seed=5))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any host sync or graph break is an error
    out = compiled(batch, labels=batch)
    expected = reference(batch, labels=batch)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, atol=1e-5, rtol=1e-4, msg=name)
    # the compiled graph records this batch's expert load (the warm-up call saw another batch)
    for layer, load in reference.expert_load().items():
        assert torch.equal(model.expert_load()[layer], load)
    assert model.dropped_slots() == reference.dropped_slots()


def test_static_cache_generation_with_compiled_forward_gives_the_dynamic_cache_tokens():
    torch._dynamo.reset()
    model = fresh(tiny_moe_config()).eval()
    prompt = ids(batch=1, length=5)
    dynamic = model.generate(prompt, max_new_tokens=8, do_sample=False)
    model.forward = torch.compile(model.forward, fullgraph=True)
    static = model.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_native_mixtral_with_dropless_compiles_fullgraph():
    from transformers import MixtralConfig, MixtralForCausalLM

    import llama_moe.modeling  # noqa: F401  (registers "dropless")

    torch._dynamo.reset()
    config = MixtralConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    model.set_experts_implementation("dropless")
    batch = ids(vocab=96)
    with torch.no_grad():
        expected = model(batch).logits
        got = torch.compile(model, fullgraph=True)(batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
