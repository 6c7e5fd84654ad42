"""Run by test_fsdp.py under `accelerate launch` with a CPU copy of training/accelerate/fsdp2.yaml: trains through
the CLI with FSDP2 on CPU (gloo), and each rank writes how its model was sharded. Test-only: lifts one gate.

accelerate 1.15 turns ACCELERATE_USE_FSDP into DistributedType.FSDP only for accelerator backends
(AcceleratorState.__init__ in accelerate/state.py: the `elif self.distributed_type in [MULTI_GPU, ..., MULTI_NEURON]`
branch); on MULTI_CPU it silently keeps DDP. torch's fully_shard itself runs on CPU over gloo, so once accelerate has
built its FSDP plugin from the launcher's environment we switch the state to FSDP exactly as that branch does on
GPUs. Everything downstream (accelerate's fsdp2_prepare_model, Trainer's FSDP save and load, our trainer) is the
unmodified code.
"""

import json
import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

import llama_moe.training.trainer as trainer_module

original_init = AcceleratorState.__init__


def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP  # what state.py does for MULTI_GPU, in both shared states
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = init_with_fsdp_on_cpu
original_train = trainer_module.MoETrainer.train


def train_and_report(self, *args, **kwargs):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    result = original_train(self, *args, **kwargs)
    params = dict(self.model.named_parameters())
    report = {
        "world": self.accelerator.num_processes,
        "is_fsdp2": self.accelerator.is_fsdp2,
        "fsdp_units": sorted(type(m).__name__ for m in self.model.modules() if isinstance(m, FSDPModule)),
        "dtensors": sum(isinstance(p, DTensor) for p in params.values()),
        "params": len(params),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params.values()),
        "full_numel": sum(p.numel() for p in params.values()),
    }
    with open(os.path.join(self.args.output_dir, f"rank{self.accelerator.process_index}.json"), "w") as handle:
        json.dump(report, handle)
    return result


trainer_module.MoETrainer.train = train_and_report

if __name__ == "__main__":
    from llama_moe.cli.main import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
