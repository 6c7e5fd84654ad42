"""Benchmark of one MoE layer against a dense SwiGLU FFN of equal active FLOPs and transformers' Mixtral block.

Times forward and forward+backward of every contender in one run, repetitions interleaved (A B C A B C ...), and
prints medians as ratios to dense plus peak memory of forward+backward. Measures only; changes nothing.

    python benchmarks/moe_layer.py                      # the three issue shapes, float32, 2 threads, CPU
    python benchmarks/moe_layer.py --dtype bfloat16 --repeats 5
    python benchmarks/moe_layer.py --tokens 1,8 --contenders dense,dropless,grouped_mm --no-backward  # decoding
"""

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_SHAPES = "8:2:1024,16:4:256,64:8:128"
CONTENDERS = {
    # name: (description, builder key, experts implementation)
    "dense": ("dense SwiGLU, width top_k * I (equal active FLOPs)", "dense", None),
    "dropless": ("LlamaMoESparseMoeBlock, dropless (ours)", "llama_moe", "dropless"),
    "grouped_mm": ("LlamaMoESparseMoeBlock, transformers grouped_mm", "llama_moe", "grouped_mm"),
    "eager": ("LlamaMoESparseMoeBlock, eager per-expert loop", "llama_moe", "eager"),
    "mixtral_grouped_mm": ("transformers MixtralSparseMoeBlock, grouped_mm", "mixtral", "grouped_mm"),
    "mixtral_dropless": ("transformers MixtralSparseMoeBlock, dropless (ours, registered)", "mixtral", "dropless"),
    "dropless_triton": ("LlamaMoESparseMoeBlock, dropless_triton (ours, CUDA only)", "llama_moe", "dropless_triton"),
}
CUDA_ONLY = {"dropless_triton"}


class DenseSwiGLU(nn.Module):
    """The reference: Llama's MLP (three bias-free linears) at the MoE's active width."""

    def __init__(self, hidden, width):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build(kind, impl, hidden, num_experts, top_k, width, dtype, device):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from llama_moe.modeling import LlamaMoEConfig, LlamaMoESparseMoeBlock

    if kind == "dense":
        module = DenseSwiGLU(hidden, top_k * width)
    else:
        options = dict(hidden_size=hidden, num_local_experts=num_experts, num_experts_per_tok=top_k)
        if kind == "llama_moe":
            config = LlamaMoEConfig(
                intermediate_size=width, moe_intermediate_size=width, num_attention_heads=8, **options
            )
            module = LlamaMoESparseMoeBlock(config)
        else:
            config = MixtralConfig(intermediate_size=width, num_attention_heads=8, **options)
            module = MixtralSparseMoeBlock(config)
        config._experts_implementation = impl
    generator = torch.Generator().manual_seed(0)  # every MoE contender gets the same weights, hence routing
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5)
    return module.to(device=device, dtype=dtype).train()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(module, x, device, clock):
    with torch.no_grad():
        sync(device)
        start = clock()
        module(x)
        sync(device)
    return clock() - start


def time_forward_backward(module, x, device, clock):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    sync(device)
    start = clock()
    module(x).sum().backward()
    sync(device)
    return clock() - start


def _proc_status_mib(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mib(module, x, device):
    """Extra peak memory of one forward+backward: CUDA allocator peak, or on CPU the resident-set high-water mark
    (reset through /proc/self/clear_refs; malloc's mmap threshold is pinned so freed buffers go back)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    from llama_moe.modeling import dropless_moe

    dropless_moe._WORKSPACE.__dict__.clear()  # count the kernel's reusable scratch buffers too
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        module(x).sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return float("nan")
    base = _proc_status_mib("VmRSS")
    module(x).sum().backward()
    return _proc_status_mib("VmHWM") - base


def machine_info(device):
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}",
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"python {platform.python_version()}, threads {torch.get_num_threads()}, CPU: {cpu} "
        f"({os.cpu_count()} logical cores), load average {os.getloadavg()[0]:.2f}",
    ]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="experts:top_k:width,... (default %(default)s)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", default="2048", help="comma-separated token counts (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per contender (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default %(default)s)")
    parser.add_argument(
        "--contenders", default=None, help="subset of: " + ",".join(CONTENDERS) + " (default: all the device runs)"
    )
    parser.add_argument("--no-backward", action="store_true", help="forward only (decoding)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time (the default); cpu: process CPU time, robust to other jobs on a shared machine "
        "when --threads 1 (with more threads it counts spin-waiting too)",
    )
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.contenders = (
        args.contenders.split(",") if args.contenders else [n for n in CONTENDERS if on_cuda or n not in CUDA_ONLY]
    )
    unknown = [name for name in args.contenders if name not in CONTENDERS]
    if unknown or "dense" not in args.contenders:
        parser.error(f"--contenders must include dense and only use {', '.join(CONTENDERS)}; got {unknown}")
    return args


def run_shape(args, shape, tokens, device, dtype):
    num_experts, top_k, width = (int(v) for v in shape.split(":"))
    modules = {
        name: build(CONTENDERS[name][1], CONTENDERS[name][2], args.hidden, num_experts, top_k, width, dtype, device)
        for name in args.contenders
    }
    x = torch.randn(1, tokens, args.hidden, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {(name, phase): [] for name in modules for phase in ("fwd", "fwd+bwd")}
    for rep in range(args.warmup + args.repeats):
        for name, module in modules.items():  # interleaved: A B C A B C ...
            fwd = time_forward(module, x, device, clock)
            fwd_bwd = None if args.no_backward else time_forward_backward(module, x, device, clock)
            if rep >= args.warmup:
                times[name, "fwd"].append(fwd)
                if fwd_bwd is not None:
                    times[name, "fwd+bwd"].append(fwd_bwd)
    medians = {key: statistics.median(value) for key, value in times.items() if value}
    return f"{num_experts}x top-{top_k}, I={width}, T={tokens}", medians


def measure_memory(args, shape, tokens, device, dtype):
    num_experts, top_k, width = (int(v) for v in shape.split(":"))
    x = torch.randn(1, tokens, args.hidden, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    memory = {}
    for name in args.contenders:
        module = build(CONTENDERS[name][1], CONTENDERS[name][2], args.hidden, num_experts, top_k, width, dtype, device)
        time_forward_backward(module, x, device, time.perf_counter)  # warm-up
        memory[name] = min(peak_memory_mib(module, x, device) for _ in range(2))
    return memory


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    import llama_moe.modeling  # noqa: F401  (registers "dropless")

    cases = [(shape, int(tokens)) for tokens in args.tokens.split(",") for shape in args.shapes.split(",")]
    if args.memory_child:
        if device.type == "cpu":  # freed buffers go back to the OS at once: the resident-set peak is one step's
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
        print(json.dumps([measure_memory(args, shape, tokens, device, dtype) for shape, tokens in cases]))
        return 0
    print("\n".join(machine_info(device)))
    print(
        f"hidden {args.hidden}, {args.dtype} on {device}, median of {args.repeats} interleaved repetitions, "
        f"{args.clock} clock"
    )
    print("Shared machine: other work may run at the same time; ratios within one run are what to compare.\n")
    results = []
    for shape, tokens in cases:
        results.append(run_shape(args, shape, tokens, device, dtype))
        print(f"  timed {results[-1][0]}", flush=True)
    memories = []
    if not args.no_backward and not args.no_memory:
        # A fresh process, so the allocator holds no freed buffers from the timing above.
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--memory-child"],
            capture_output=True,
            text=True,
            check=True,
        )
        memories = json.loads(child.stdout.strip().splitlines()[-1])

    for phase in ["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]:
        print(f"\n{phase}: time as a ratio to the dense SwiGLU of equal active FLOPs (lower is better)\n")
        header = ["shape", "dense ms"] + [name for name in args.contenders if name != "dense"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for label, medians in results:
            dense = medians["dense", phase]
            cells = [label, f"{dense * 1e3:.1f}"] + [f"{medians[name, phase] / dense:.2f}x" for name in header[2:]]
            print("| " + " | ".join(cells) + " |")
    if memories:
        where = "CUDA allocator" if device.type == "cuda" else "resident set"
        print(f"\nPeak extra memory of one forward+backward, MiB ({where}; ratio to grouped_mm in brackets)\n")
        print("| shape | " + " | ".join(args.contenders) + " |")
        print("|" + "---|" * (len(args.contenders) + 1))
        for (label, _), memory in zip(results, memories):
            base = memory.get("grouped_mm")
            cells = [
                f"{memory[name]:.0f}" + (f" ({memory[name] / base:.2f}x)" if base else "") for name in args.contenders
            ]
            print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
