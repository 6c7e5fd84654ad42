"""Two CPU processes (torchrun, gloo) train the same model: they agree with each other and with one process
that sees the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from tests.training.helpers import train_args

pytestmark = pytest.mark.slow


def test_two_processes_agree_with_each_other_and_with_one(tmp_path, corpora, tiny_model_dir):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    steps = 4
    two = tmp_path / "two"
    # No balance loss here: it is a product of per-batch averages, so its DDP mean over two half-batches is not its
    # value on the whole batch, and the comparison with one process below would measure that instead of DDP.
    args = train_args(
        tiny_model_dir, corpora, two, steps, per_device_train_batch_size=2, save_steps=2, router_aux_loss_coef=0.0
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561", worker]
    done = subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.load(open(two / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"] and ranks[0]["param_abs_sum"] == ranks[1]["param_abs_sum"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert os.path.isfile(two / "checkpoint-2" / "mixture_state.json")
    assert os.path.isfile(two / "final" / "model.safetensors")

    one = tmp_path / "one"
    single = train_args(
        tiny_model_dir, corpora, one, steps, per_device_train_batch_size=4, save_steps=2, router_aux_loss_coef=0.0
    )
    done = subprocess.run([sys.executable, worker, *single], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.load(open(one / "rank0.json"))
    assert reference["world"] == 1
    # Same global batch of 4 blocks per step (2 per rank): same losses and weights up to float reordering.
    assert ranks[0]["losses"] == pytest.approx(reference["losses"], rel=1e-4)
    assert ranks[0]["param_abs_sum"] == pytest.approx(reference["param_abs_sum"], rel=1e-4)
