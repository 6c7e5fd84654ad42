"""What transformers' common model tests check of every decoder, checked here for LlamaMoE in our own words:
padding and masks, left-padded batched generation, SDPA against eager attention, save/load, resized embeddings,
assisted decoding, static cache, tied and untied embeddings, hidden states and attentions, logits_to_keep."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import tiny_moe_config

PAD = 0


def model_of(seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaMoEForCausalLM(tiny_moe_config(pad_token_id=PAD, **overrides)).eval()


def ids(batch=2, length=10, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(sequences):
    """A left-padded batch and its mask from sequences of different lengths."""
    width = max(len(s) for s in sequences)
    batch = torch.full((len(sequences), width), PAD)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, width - len(sequence) :] = sequence
        mask[row, width - len(sequence) :] = 1
    return batch, mask


def test_masked_padding_changes_no_real_token():
    """Each token's FFN is its own (dropless routing has no cross-token coupling), so masking is all it takes."""
    model = model_of()
    short, long = ids(1, 6, seed=1)[0], ids(1, 10, seed=2)[0]
    batch, mask = left_pad([short, long])
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        alone = model(short[None]).logits
    torch.testing.assert_close(padded[0, -6:], alone[0], atol=1e-5, rtol=1e-5)


def test_left_padded_batched_generation_matches_one_by_one():
    model = model_of()
    prompts = [ids(1, 4, seed=3)[0], ids(1, 9, seed=4)[0]]
    batch, mask = left_pad(prompts)
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        assert torch.equal(together[row, -6:], alone[0, -6:])


def test_sdpa_and_eager_attention_agree():
    batch = ids()
    sdpa, eager = model_of(), model_of()
    sdpa.set_attn_implementation("sdpa")
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(batch).logits, eager(batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_keeps_logits_and_tying(tmp_path, tied):
    model = model_of(tie_word_embeddings=tied)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is LlamaMoEForCausalLM
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tied
    batch = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, model(batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_resized_token_embeddings_keep_the_old_rows(tied):
    model = model_of(tie_word_embeddings=tied)
    embeddings, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(160)
    assert model.config.vocab_size == 160
    assert model.model.embed_tokens.weight.shape == (160, 64) and model.lm_head.weight.shape == (160, 64)
    torch.testing.assert_close(model.model.embed_tokens.weight[:128], embeddings)
    torch.testing.assert_close(model.lm_head.weight[:128], head)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():
        assert model(torch.tensor([[150, 3, 7]])).logits.shape == (1, 3, 160)


@pytest.mark.parametrize("assistant", ["model", "prompt lookup"])
def test_assisted_decoding_gives_the_greedy_tokens(assistant):
    model = model_of()
    prompt = ids(1, 8, seed=5)
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    extra = dict(assistant_model=model_of(seed=1)) if assistant == "model" else dict(prompt_lookup_num_tokens=3)
    assisted = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=PAD, **extra)
    assert torch.equal(assisted, greedy)


def test_static_cache_gives_the_dynamic_cache_tokens():
    model = model_of()
    prompt = ids(1, 6, seed=6)
    dynamic = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    static = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=PAD, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_hidden_states_and_attentions_are_returned_per_layer():
    model = model_of(moe_layers=[1])
    model.set_attn_implementation("eager")  # SDPA computes no attention weights
    batch = ids(2, 7)
    with torch.no_grad():
        out = model(batch, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 7, 64) for h in out.hidden_states)
    assert len(out.attentions) == model.config.num_hidden_layers
    assert all(a.shape == (2, 4, 7, 7) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 7))  # rows of attention weights


def test_logits_to_keep_returns_the_last_positions():
    model = model_of()
    batch = ids()
    with torch.no_grad():
        full = model(batch).logits
        last = model(batch, logits_to_keep=3).logits
    assert last.shape == (2, 3, 128)
    torch.testing.assert_close(last, full[:, -3:], atol=1e-6, rtol=1e-6)
