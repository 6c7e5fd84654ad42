"""Run by test_parallel_plans.py under torchrun (2 CPU processes, gloo): loads a checkpoint with transformers'
own tensor + expert parallelism (`DistributedConfig(tp_size=2, ep_size=2)`, the model's plans) and with no
parallelism, and writes, per rank, what it held and how far the sharded model's outputs and gradients are from the
single-process ones."""

import json
import sys

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import llama_moe.modeling  # noqa: F401  (registers the model without trust_remote_code)


def local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def main(folder: str, report_prefix: str) -> None:
    ids = torch.tensor([[1, 5, 9, 33, 17, 2, 8, 60, 3, 41]])
    single = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sharded = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, distributed_config=DistributedConfig(tp_size=2, ep_size=2)
    ).eval()
    with torch.no_grad():
        logits_diff = (sharded(ids).logits - single(ids).logits).abs().max().item()
    same_tokens = torch.equal(
        sharded.generate(ids, max_new_tokens=8, do_sample=False),
        single.generate(ids, max_new_tokens=8, do_sample=False),
    )
    # Training: gradients of every parameter, gathered, against the single process's (the expert exchange runs
    # all-to-all when gradients flow).
    sharded.train(), single.train()
    sharded(ids, labels=ids).loss.backward()
    single(ids, labels=ids).loss.backward()
    grad_diff = {
        name: (full(param.grad) - reference.grad).abs().max().item()
        for (name, param), reference in zip(sharded.named_parameters(), single.parameters())
    }
    report = {
        "world": torch.distributed.get_world_size(),
        "logits_diff": logits_diff,
        "same_tokens": same_tokens,
        "grad_diff": grad_diff,
        "local_numel": {name: local(param).numel() for name, param in sharded.named_parameters()},
        "full_numel": {name: param.numel() for name, param in single.named_parameters()},
    }
    with open(f"{report_prefix}{torch.distributed.get_rank()}.json", "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
