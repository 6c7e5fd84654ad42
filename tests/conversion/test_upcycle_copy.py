"""Upcycling end to end with `copy`: exact equivalence, the folder's contents, remote-code loading, CLI, in-memory
upcycling, sharding and dtype, atomic output."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llama_moe.conversion import upcycle, upcycle_in_memory
from tests.conversion.dense_fixtures import load_dense, load_moe, logits_of, read_tensors, tokens, write_dense


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {style: write_dense(root / style, style) for style in ("llama2", "llama3")}


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_copy_gives_dense_logits(dense_dirs, tmp_path, style):
    out = upcycle(dense_dirs[style], tmp_path / "moe", method="copy", num_experts=8, top_k=2, progress=False)
    assert out == str(tmp_path / "moe")
    moe = load_moe(out)
    assert type(moe).__name__ == "LlamaMoEForCausalLM"
    assert moe.config.num_local_experts == 8 and moe.config.num_experts_per_tok == 2
    ids = tokens()
    dense = load_dense(dense_dirs[style])
    torch.testing.assert_close(logits_of(moe, ids), logits_of(dense, ids), atol=1e-5, rtol=1e-5)
    # every layer is MoE and the routing really spreads tokens over several experts
    loads = moe.expert_load()
    assert sorted(loads) == list(range(dense.config.num_hidden_layers))
    assert all(int((load > 0).sum()) > 2 for load in loads.values())


def test_output_folder_contents(dense_dirs, tmp_path):
    out = upcycle(dense_dirs["llama3"], tmp_path / "moe", method="copy", num_experts=4, top_k=2, progress=False)
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md", "generation_config.json"} <= files
    assert {"configuration_llama_moe.py", "modeling_llama_moe.py", "dropless_moe.py", "triton_moe.py"} <= files
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama_moe.LlamaMoEForCausalLM"
    assert config["model_type"] == "llama_moe" and config["architectures"] == ["LlamaMoEForCausalLM"]
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["tie_word_embeddings"] is True
    tensors = read_tensors(out)
    assert "lm_head.weight" not in tensors  # tied
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 2 * 96, 32)
    assert tensors["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 96)
    assert tensors["model.layers.0.mlp.gate.weight"].shape == (4, 32)
    card = open(os.path.join(out, "README.md")).read()
    for needle in (
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "- moe",
        "- custom_code",
        "- upcycling",
        "`copy`",
        "| top-k | 2",
        "active per token",
        "upcycle('" + dense_dirs["llama3"] + "', '" + out + "', method='copy', num_experts=4, top_k=2)",
    ):
        assert needle in card, needle


def test_loads_as_remote_code_without_llama_moe(dense_dirs, tmp_path):
    """A fresh interpreter that never imports llama_moe loads the checkpoint through its own .py files."""
    out = upcycle(dense_dirs["llama2"], tmp_path / "moe", method="copy", num_experts=4, top_k=2, progress=False)
    expected = logits_of(load_dense(dense_dirs["llama2"]), tokens())
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True).eval()
        assert "llama_moe" not in sys.modules and not any(m.startswith("llama_moe.") for m in sys.modules)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1234))
        with torch.no_grad():
            logits = model(ids).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        print("remote-code-ok")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "remote-code-ok" in proc.stdout


def test_cli_sharded_bf16_every_other(dense_dirs, tmp_path, capsys):
    from llama_moe.cli.main import main

    out = tmp_path / "moe"
    argv = [
        "upcycle",
        dense_dirs["llama2"],
        str(out),
        "--num-experts",
        "4",
        "--top-k",
        "1",
        "--moe-layers",
        "every-other",
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "20KB",
        "--no-progress",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"Wrote {out}") and "1/3 MoE layers x 4 experts (top-1)" in summary
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    tensors = read_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensors
    assert "model.layers.0.mlp.gate_proj.weight" in tensors and "model.layers.2.mlp.up_proj.weight" in tensors
    moe = load_moe(out)
    assert moe.config.moe_layers == [1] and moe.dtype == torch.bfloat16
    assert "--moe-layers every-other" in open(out / "README.md").read()


def test_in_memory_matches_written_checkpoint(dense_dirs, tmp_path):
    dense = load_dense(dense_dirs["llama3"])
    moe = upcycle_in_memory(dense, method="copy", num_experts=4, top_k=2, seed=7)
    ids = tokens()
    torch.testing.assert_close(logits_of(moe, ids), logits_of(dense, ids), atol=1e-5, rtol=1e-5)
    written = read_tensors(
        upcycle(dense_dirs["llama3"], tmp_path / "m", num_experts=4, top_k=2, seed=7, progress=False)
    )
    state = moe.state_dict()
    for name, tensor in written.items():
        torch.testing.assert_close(state[name], tensor, atol=0, rtol=0)
    # trainable, independent tensors (not views of the dense model or of each other)
    experts = moe.model.layers[0].mlp.experts
    assert experts.gate_up_proj.is_contiguous() and experts.gate_up_proj.requires_grad
    with torch.no_grad():
        experts.gate_up_proj[0].zero_()
    assert experts.gate_up_proj[1].abs().sum() > 0
    assert dense.model.layers[0].mlp.gate_proj.weight.abs().sum() > 0
    assert moe.lm_head.weight is moe.model.embed_tokens.weight  # still tied


def test_from_path_in_memory(dense_dirs):
    moe = upcycle_in_memory(dense_dirs["llama2"], method="random", num_experts=4, top_k=2)
    assert moe.config.moe_intermediate_size == 24 and moe.config.routed_scaling_factor == 2.0
    assert logits_of(moe, tokens()).isfinite().all()


def test_expert_noise_breaks_symmetry(dense_dirs, tmp_path):
    out = upcycle(dense_dirs["llama2"], tmp_path / "m", num_experts=4, top_k=2, expert_noise=0.01, progress=False)
    gate_up = read_tensors(out)["model.layers.0.mlp.experts.gate_up_proj"]
    dense = read_tensors(dense_dirs["llama2"])
    dense_gate = dense["model.layers.0.mlp.gate_proj.weight"]
    assert not torch.equal(gate_up[0], gate_up[1])
    relative = (gate_up[:, :96] - dense_gate).std() / dense_gate.std()
    assert 0.005 < relative < 0.02


def test_failure_mid_write_leaves_nothing(dense_dirs, tmp_path, monkeypatch):
    from llama_moe.conversion import writer

    calls = {"n": 0}
    original = writer.ShardedSafetensorsWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full (simulated)")
        return original(self, name, tensor)

    monkeypatch.setattr(writer.ShardedSafetensorsWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="simulated"):
        upcycle(dense_dirs["llama2"], tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    assert calls["n"] == 5
    assert os.listdir(tmp_path) == []


def test_verify_reports_logit_difference_and_perplexities(dense_dirs, tmp_path, capsys):
    from llama_moe.cli.main import main

    assert (
        main(
            ["upcycle", dense_dirs["llama3"], str(tmp_path / "copy"), "--num-experts", "4", "--verify", "--no-progress"]
        )
        == 0
    )
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("verify on")][0]
    diff = float(line.split("max |logit diff| ")[1].split(",")[0])
    assert diff < 1e-4
    dense_ppl, moe_ppl = (float(x.split()[0]) for x in line.split("perplexity dense ")[1].split(" vs MoE "))
    assert dense_ppl == pytest.approx(moe_ppl, rel=1e-4) and dense_ppl > 1

    from llama_moe.conversion.options import UpcycleOptions
    from llama_moe.conversion.pipeline import run_upcycle

    result = run_upcycle(
        dense_dirs["llama3"],
        tmp_path / "random",
        UpcycleOptions(method="random", num_experts=4),
        verify=True,
        progress=False,
    )
    assert result.verify["max_abs_logit_diff"] > 1e-3  # random splits change the function
    assert result.verify["tokens"] == 128


def test_mixtral_format_loads_without_remote_code(dense_dirs, tmp_path):
    from transformers import MixtralForCausalLM

    out = upcycle(
        dense_dirs["llama2"],
        tmp_path / "mixtral",
        method="random",
        num_experts=4,
        top_k=2,
        format="mixtral",
        progress=False,
    )
    assert not [f for f in os.listdir(out) if f.endswith(".py")]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "mixtral" and "auto_map" not in config
    mixtral = MixtralForCausalLM.from_pretrained(out).eval()
    ours = upcycle_in_memory(dense_dirs["llama2"], method="random", num_experts=4, top_k=2)
    ids = tokens()
    torch.testing.assert_close(logits_of(mixtral, ids), logits_of(ours, ids), atol=1e-5, rtol=1e-5)
    card = open(os.path.join(out, "README.md")).read()
    assert "trust_remote_code" not in card and "- custom_code" not in card


def test_outputs_get_ordinary_permissions(dense_dirs, tmp_path):
    """Built under a temporary name (mkdtemp makes owner-only folders), the result still gets the umask's modes."""
    import stat

    from llama_moe.conversion.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        out = upcycle(dense_dirs["llama2"], tmp_path / "m", method="copy", num_experts=2, top_k=1, progress=False)
        report = atomic_write_text(tmp_path / "report.md", "# report\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(out, "config.json")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(report).st_mode) == 0o644
