"""Where the time of one MoE layer goes: torch.profiler over forward and forward+backward, ops grouped in stages.

Stages (routing, sort, gather, GEMMs, activation, scatter, other) are named from the aten ops each stage issues;
the dense SwiGLU of equal active FLOPs is profiled alongside for reference. Measures only; changes nothing.

    python benchmarks/profile_moe.py --shapes 64:8:128 --impl dropless
"""

import argparse
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.moe_layer import CONTENDERS, DEFAULT_SHAPES, build

# aten op -> stage; anything else is "other".
STAGES = {
    "routing": (
        "aten::linear",
        "aten::addmm",
        "aten::softmax",
        "aten::_softmax",
        "aten::topk",
        "aten::div",
        "aten::sum",
        "aten::_softmax_backward_data",
        "aten::topk_backward",
        "aten::value_selecting_reduction_backward",
    ),
    "sort": (
        "aten::argsort",
        "aten::sort",
        "aten::bincount",
        "aten::histc",
        "aten::cumsum",
        "aten::floor_divide",
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::masked_fill",
    ),
    "gather": ("aten::index", "aten::index_select", "aten::gather", "aten::take"),
    "GEMMs": ("aten::mm", "aten::bmm", "aten::matmul", "aten::_grouped_mm", "aten::grouped_mm"),
    "activation": (
        "aten::silu",
        "aten::sigmoid",
        "aten::silu_backward",
        "aten::sigmoid_backward",
        "aten::mul",
        "aten::mul_",
        "aten::add",
        "aten::add_",
        "aten::rsub",
        "aten::sub",
        "aten::gelu",
        "aten::addcmul_",
        "aten::addcmul",
        "aten::cat",
        "aten::split",
        "aten::chunk",
    ),
    "scatter": (
        "aten::index_add_",
        "aten::index_add",
        "aten::index_put_",
        "aten::scatter_add_",
        "aten::scatter_",
        "aten::index_put",
    ),
    "alloc/copy": (
        "aten::zeros",
        "aten::zeros_like",
        "aten::empty",
        "aten::empty_like",
        "aten::copy_",
        "aten::to",
        "aten::_to_copy",
        "aten::fill_",
        "aten::zero_",
        "aten::clone",
        "aten::contiguous",
    ),
}
OP_STAGE = {op: stage for stage, ops in STAGES.items() for op in ops}


def stage_breakdown(module, x, backward, repeats):
    def step():
        if backward:
            module.zero_grad(set_to_none=True)
            module(x.detach().requires_grad_()).sum().backward()
        else:
            with torch.no_grad():
                module(x)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    totals = defaultdict(float)
    for event in prof.key_averages():
        totals[OP_STAGE.get(event.key, "other")] += event.self_cpu_time_total / 1e3 / repeats
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    top = [(e.key, e.self_cpu_time_total / 1e3 / repeats, e.count // repeats) for e in ops]
    return totals, top


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--impl", default="dropless", choices=[n for n in CONTENDERS if n != "dense"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import llama_moe.modeling  # noqa: F401

    dtype = getattr(torch, args.dtype)
    print(
        f"command: python benchmarks/profile_moe.py {' '.join(sys.argv[1:])}; torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; self CPU ms per call (profiler overhead included)"
    )
    for shape in args.shapes.split(","):
        num_experts, top_k, width = (int(v) for v in shape.split(":"))
        x = torch.randn(1, args.tokens, args.hidden).to(dtype)
        for name in ("dense", args.impl):
            kind, impl = CONTENDERS[name][1], CONTENDERS[name][2]
            module = build(kind, impl, args.hidden, num_experts, top_k, width, dtype, torch.device("cpu"))
            for backward in (False, True):
                totals, top = stage_breakdown(module, x, backward, args.repeats)
                phase = "fwd+bwd" if backward else "fwd"
                total = sum(totals.values())
                stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v > 0.05)
                print(f"\n{shape} {name} {phase}: total {total:.1f} ms = {stages}")
                if name != "dense":
                    print("   top ops: " + "; ".join(f"{k} {ms:.1f} ms x{n}" for k, ms, n in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
