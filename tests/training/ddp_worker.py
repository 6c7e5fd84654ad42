"""Run under torchrun by test_multiprocess.py: trains through the CLI, then each rank writes what it ended with."""

import json
import os
import sys

import torch

import llama_moe.training.trainer as trainer_module
from llama_moe.cli.main import main as cli_main

original_train = trainer_module.MoETrainer.train


def train_and_report(self, *args, **kwargs):
    result = original_train(self, *args, **kwargs)
    params = torch.cat([p.detach().double().flatten() for p in self.model.parameters()])
    report = {
        "world": self.accelerator.num_processes,
        "param_sum": params.sum().item(),
        "param_abs_sum": params.abs().sum().item(),
        "weights": self.mixture.dataset.weights,
        "losses": [entry["loss"] for entry in self.state.log_history if "loss" in entry],
    }
    path = os.path.join(self.args.output_dir, f"rank{self.accelerator.process_index}.json")
    with open(path, "w") as handle:
        json.dump(report, handle)
    return result


trainer_module.MoETrainer.train = train_and_report

if __name__ == "__main__":
    sys.exit(cli_main(["train", *sys.argv[1:]]))
