"""Saved checkpoints carry their code: they load and generate through AutoModelForCausalLM with
trust_remote_code in a Python where llama_moe cannot be imported; with the package, no remote code needed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import tiny_moe_config

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_saved_checkpoint_loads_and_generates_without_the_package(tmp_path):
    model = LlamaMoEForCausalLM(tiny_moe_config(moe_layers=[1], shared_expert_intermediate_size=16)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    bundle = {"configuration_llama_moe.py", "modeling_llama_moe.py", "dropless_moe.py", "moe_ops.py", "triton_moe.py"}
    assert bundle | {"model.safetensors"} <= set(files)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama_moe.LlamaMoEForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_llama_moe.LlamaMoEConfig"

    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch
        try:
            import llama_moe
            sys.exit("llama_moe must not be importable here")
        except ImportError:
            pass
        try:
            import triton
            sys.exit("triton must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert type(model).__name__ == "LlamaMoEForCausalLM", type(model)
        assert "llama_moe" not in type(model).__module__.split(".")[0], type(model).__module__
        assert model.config._experts_implementation == "dropless", model.config._experts_implementation
        out = model.generate(torch.tensor([[3, 14, 15, 92, 65]]), max_new_tokens=6, do_sample=False)
        print("TOKENS", out.tolist())
    """)
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, str(TOOLS / "without_llama_moe.py"), str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = [line for line in result.stdout.splitlines() if line.startswith("TOKENS")]
    assert tokens == [f"TOKENS {expected.tolist()}"]


def test_auto_classes_know_llama_moe_without_remote_code(tmp_path):
    LlamaMoEForCausalLM(tiny_moe_config()).save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "LlamaMoEConfig"
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model, LlamaMoEForCausalLM)
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"
