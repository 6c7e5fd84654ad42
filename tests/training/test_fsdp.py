"""FSDP2 (training/accelerate/fsdp2.yaml) on 2 CPU processes (gloo): the model is really sharded per decoder layer,
checkpoints load with trust_remote_code, the weights match DDP on the same batches, and resuming is exact."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.training.helpers import train_args

pytestmark = pytest.mark.slow

HERE = os.path.dirname(__file__)
SHIPPED = os.path.join(HERE, "..", "..", "training", "accelerate", "fsdp2.yaml")
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def cpu_config(tmp_path, port):
    """The shipped config with only what a 2-core CPU needs changed: 2 processes, fp32, a free port."""
    with open(SHIPPED) as handle:
        config = yaml.safe_load(handle)
    config.update(use_cpu=True, num_processes=2, mixed_precision="no", main_process_port=port)
    path = tmp_path / f"fsdp2_cpu_{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run(command):
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def fsdp(tmp_path, port, args):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cpu_config(tmp_path, port)]
    return run(launch + [os.path.join(HERE, "fsdp_worker.py"), *args])


def test_fsdp2_shards_saves_loadable_checkpoints_matches_ddp_and_resumes(tmp_path, corpora, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    steps, flags = 4, dict(per_device_train_batch_size=2, save_steps=2)
    sharded = tmp_path / "fsdp"
    done = fsdp(tmp_path, 29563, train_args(tiny_model_dir, corpora, sharded, steps, **flags))
    assert "does not shard on CPU" not in done.stdout

    # Really FSDP2, not accelerate's silent DDP fallback: one unit per decoder layer, every parameter a DTensor
    # with half of it on each rank.
    for rank in (0, 1):
        report = json.load(open(sharded / f"rank{rank}.json"))
        assert report["world"] == 2 and report["is_fsdp2"]
        assert report["fsdp_units"].count("FSDPLlamaMoEDecoderLayer") == 2
        assert "FSDPLlamaMoEForCausalLM" in report["fsdp_units"]
        assert report["dtensors"] == report["params"]
        assert report["local_numel"] < 0.6 * report["full_numel"]

    # FULL_STATE_DICT checkpoints are plain Hugging Face folders with our remote code (not torch's _fsdp_*.py).
    for folder in (sharded / "checkpoint-2", sharded / "checkpoint-4", sharded / "final"):
        assert os.path.isfile(folder / "mixture_state.json")
        assert not [name for name in os.listdir(folder) if name.startswith("_fsdp")]
        auto_map = json.load(open(folder / "config.json"))["auto_map"]
        assert auto_map["AutoModelForCausalLM"] == "modeling_llama_moe.LlamaMoEForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(sharded / "final", trust_remote_code=True)
    assert type(loaded).__name__ == "LlamaMoEForCausalLM"

    # DDP on the same per-rank batches optimizes the same objective; only the gradient reduction differs (sharded
    # reduce-scatter vs all-reduce), so the weights agree to float rounding (measured max 1.2e-7; they moved 7.5e-3
    # from the start). A single process with the same global batch is no reference here: its balance loss is a
    # product of whole-batch averages, not the mean over the two halves, and its router ends ~1e-2 away.
    replicated = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29564"]
    ddp_args = train_args(tiny_model_dir, corpora, replicated, steps, **flags)
    run(torchrun + [os.path.join(HERE, "ddp_worker.py"), *ddp_args])
    reference = load_file(replicated / "final" / "model.safetensors")
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    state = loaded.state_dict()
    assert sorted(reference) == sorted(k for k in state if k in reference) and len(reference) == len(start)
    for name, tensor in reference.items():
        assert not torch.equal(tensor, start[name]), name
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-5, msg=name)

    # Resume under FSDP from checkpoint-2 (model, optimizer, scheduler, mixture): the same final weights.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(sharded / "checkpoint-2", resumed / "checkpoint-2")
    args = train_args(tiny_model_dir, corpora, resumed, steps, **flags)
    fsdp(tmp_path, 29565, args + ["--resume_from_checkpoint", str(resumed / "checkpoint-2")])
    history = json.load(open(resumed / "checkpoint-4" / "trainer_state.json"))["log_history"]
    uninterrupted = json.load(open(sharded / "checkpoint-4" / "trainer_state.json"))["log_history"]
    assert [e["loss"] for e in history if "loss" in e] == [e["loss"] for e in uninterrupted if "loss" in e]
    after = load_file(resumed / "final" / "model.safetensors")
    straight = load_file(sharded / "final" / "model.safetensors")
    for name, tensor in straight.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_unconnected_processes_fail_before_loading(monkeypatch):
    """Without GPUs, `accelerate launch` of an FSDP config starts processes that each train alone (no
    ACCELERATE_USE_CPU: world size 1) or that never average gradients (--ddp_backend gloo: DistributedType.NO);
    train() stops both before loading anything. DDP on CPU and DeepSpeed over gloo pass."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from llama_moe.training.run import check_processes_connected

    def config(world, kind):
        return SimpleNamespace(world_size=world, distributed_state=SimpleNamespace(distributed_type=kind))

    monkeypatch.setenv("WORLD_SIZE", "2")
    for world, kind in ((1, DistributedType.NO), (2, DistributedType.NO)):
        with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=1"):
            check_processes_connected(config(world, kind))
    for kind in (DistributedType.MULTI_CPU, DistributedType.DEEPSPEED, DistributedType.FSDP):
        check_processes_connected(config(2, kind))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_processes_connected(config(1, DistributedType.NO))
