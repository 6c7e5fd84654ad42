"""`--format gguf`: the llama.cpp architecture follows the routing, every tensor lands where llama.cpp reads it
(read back with gguf's own reader and, for qwen2moe, through transformers' GGUF loader: same logits), and what
llama.cpp cannot compute is refused before a byte is written."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen2MoeForCausalLM

from llama_moe.conversion.engines import gguf_architecture
from llama_moe.conversion.formats import export_checkpoint
from llama_moe.conversion.gguf_export import export_gguf
from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import LLAMA3_ROPE, tiny_moe_config

VOCAB = 320


def _byte_level_tokenizer(folder):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["def fibonacci(n): return n if n < 2 else fibonacci(n - 1)"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(folder)


def _saved(tmp_path, **overrides):
    config = tiny_moe_config(vocab_size=VOCAB, **overrides)
    model = LlamaMoEForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0.0, 0.5)  # decisive routing
    src = tmp_path / "moe"
    model.save_pretrained(src)
    _byte_level_tokenizer(src)
    return model, src


def _read(path):
    reader = GGUFReader(path)
    tensors = {t.name: torch.from_numpy(np.array(t.data)).float() for t in reader.tensors}
    fields = {}
    for name, field in reader.fields.items():
        value = field.contents()
        fields[name] = value
    return tensors, fields


def _half_split_rows(weight, heads):
    """Inverse of llama.cpp's q/k permutation, written independently: pairwise rows back to halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


CASES = {
    "llama": dict(routed_scaling_factor=2.0, router_temperature=0.5),
    "granitemoe": dict(shared_expert_intermediate_size=48, rope_parameters=dict(LLAMA3_ROPE)),
    "qwen2moe": dict(shared_expert_intermediate_size=48, norm_topk_prob=False, tie_word_embeddings=True),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_every_tensor_is_where_llama_cpp_reads_it(tmp_path, arch):
    ours, src = _saved(tmp_path, **CASES[arch])
    c = ours.config
    assert gguf_architecture(c, []) == arch
    out = export_gguf(src, tmp_path / "model.gguf", outtype="f32", tokenizer_pre="gpt-2", progress=False)
    tensors, fields = _read(out)
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.expert_count"] == c.num_local_experts
    assert fields[f"{arch}.expert_used_count"] == c.num_experts_per_tok
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == VOCAB
    state = {k: v.float() for k, v in ours.state_dict().items()}
    torch.testing.assert_close(tensors["token_embd.weight"], state["model.embed_tokens.weight"], atol=0, rtol=0)
    assert ("output.weight" in tensors) == (arch == "qwen2moe" or not c.tie_word_embeddings)
    scale, temperature = c.routed_scaling_factor, c.router_temperature
    for i in range(c.num_hidden_layers):
        blk, ly = f"blk.{i}.", f"model.layers.{i}."
        q, k = tensors[blk + "attn_q.weight"], tensors[blk + "attn_k.weight"]
        if arch != "qwen2moe":  # interleaved RoPE
            q, k = _half_split_rows(q, c.num_attention_heads), _half_split_rows(k, c.num_key_value_heads)
        torch.testing.assert_close(q, state[ly + "self_attn.q_proj.weight"], atol=0, rtol=0)
        torch.testing.assert_close(k, state[ly + "self_attn.k_proj.weight"], atol=0, rtol=0)
        torch.testing.assert_close(tensors[blk + "ffn_gate_inp.weight"], state[ly + "mlp.gate.weight"] / temperature)
        gate_up = state[ly + "mlp.experts.gate_up_proj"]
        width = c.moe_intermediate_size
        assert tensors[blk + "ffn_gate_exps.weight"].shape == (c.num_local_experts, width, c.hidden_size)
        torch.testing.assert_close(tensors[blk + "ffn_gate_exps.weight"], gate_up[:, :width], atol=0, rtol=0)
        torch.testing.assert_close(tensors[blk + "ffn_up_exps.weight"], gate_up[:, width:], atol=0, rtol=0)
        torch.testing.assert_close(tensors[blk + "ffn_down_exps.weight"], state[ly + "mlp.experts.down_proj"] * scale)
        if c.shared_expert_intermediate_size:
            shared_down = state[ly + "mlp.shared_expert.down_proj.weight"]
            factor = 2.0 if arch == "qwen2moe" else 1.0  # against a gate of exactly 1/2
            torch.testing.assert_close(tensors[blk + "ffn_down_shexp.weight"], shared_down * factor)
    if "rope_freqs.weight" in tensors:
        assert tensors["rope_freqs.weight"].shape == (c.head_dim // 2,) and tensors["rope_freqs.weight"].max() > 1


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_qwen2moe_gguf_read_back_by_transformers_gives_our_logits(tmp_path, outtype):
    ours, src = _saved(tmp_path, **CASES["qwen2moe"])
    rounded = {"f16": torch.float16, "bf16": torch.bfloat16}.get(outtype)
    if rounded:  # the rounding the file applies: matrices, but not routers and norms (kept float32)
        with torch.no_grad():
            for name, param in ours.named_parameters():
                if param.dim() > 1 and not name.endswith("mlp.gate.weight"):
                    param.copy_(param.to(rounded).float())
    export_checkpoint(src, tmp_path / "hf", "qwen2_moe")  # the same architecture's config, as transformers has it
    config = Qwen2MoeConfig.from_pretrained(tmp_path / "hf")
    export_gguf(src, tmp_path / "gguf" / "model.gguf", outtype=outtype, tokenizer_pre="gpt-2", progress=False)
    qwen = Qwen2MoeForCausalLM.from_pretrained(
        tmp_path / "gguf", gguf_file="model.gguf", config=config, dtype=torch.float32
    ).eval()
    input_ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(qwen(input_ids).logits, ours(input_ids).logits, atol=1e-4, rtol=1e-4)


def test_what_llama_cpp_cannot_compute_is_refused_before_writing(tmp_path):
    _, src = _saved(tmp_path, moe_layers=[1], shared_expert_intermediate_size=48, shared_expert_gate=True)
    out = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match=r"llama.cpp cannot compute.*\n.*layers \[0\] are dense.*\n.*gated shared"):
        export_gguf(src, out, tokenizer_pre="gpt-2")
    assert not list(tmp_path.glob("model.gguf*"))
    with pytest.raises(ValueError, match="must end in .gguf"):
        export_gguf(src, tmp_path / "model.bin")


def test_an_unknown_pre_tokenizer_is_named_not_guessed(tmp_path):
    _, src = _saved(tmp_path)
    with pytest.raises(ValueError, match="--gguf-tokenizer-pre"):
        export_gguf(src, tmp_path / "model.gguf", progress=False)
    assert not list(tmp_path.glob("model.gguf*"))


def test_upcycle_and_export_write_gguf_from_the_command_line(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_moe.cli.main import main

    dense_config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(dense_config).save_pretrained(tmp_path / "dense")
    _byte_level_tokenizer(tmp_path / "dense")
    out = tmp_path / "moe.gguf"
    argv = [
        "upcycle",
        str(tmp_path / "dense"),
        str(out),
        "--format",
        "gguf",
        "--gguf-tokenizer-pre",
        "gpt-2",
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "architecture llama" in printed and printed.strip().splitlines()[-1].startswith(f"Wrote {out}")
    assert _read(out)[1]["general.architecture"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe.gguf"]  # nothing staged is left

    _, src = _saved(tmp_path / "ckpt", **CASES["qwen2moe"])
    assert main(["export", str(src), str(tmp_path / "q.gguf"), "--format", "gguf", "--engine", "vllm"]) == 2
    assert "vLLM cannot compute this gguf checkpoint" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                str(src),
                str(tmp_path / "q.gguf"),
                "--format",
                "gguf",
                "--outtype",
                "f16",
                "--gguf-tokenizer-pre",
                "gpt-2",
            ]
        )
        == 0
    )
    assert _read(tmp_path / "q.gguf")[1]["general.file_type"] == 1  # MOSTLY_F16
