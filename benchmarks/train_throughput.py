"""Training throughput of upcycled SmolLM2-135M (8 experts, top-2, copy) against dense SmolLM2-135M, same data.

Measures tokens/s and MFU (FLOPs from ACTIVE parameters) through the real `llama-moe train` pipeline; it is a
benchmark, not a test: nothing is asserted. Run: python benchmarks/train_throughput.py [--steps 8] [--json out.json]

On CPU there is no vendor peak, so the "peak" is the FLOP/s this machine reaches on a large fp32 matmul (measured
first); the MoE/dense MFU ratio does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def smollm2_gguf() -> str:
    from llama_moe.cli.quickstart import default_base

    try:
        return default_base()
    except FileNotFoundError as error:
        sys.exit(str(error))


def matmul_peak(device: str, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def corpus(folder: str) -> str:
    import shutil
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    os.makedirs(folder, exist_ok=True)
    for name in ("argparse.py", "typing.py", "inspect.py", "pathlib.py", "dataclasses.py"):
        shutil.copy(os.path.join(stdlib, name), folder)
    return folder


def run(label: str, source_flags: list[str], data: str, out: str, args, peak: float) -> dict:
    from llama_moe.training.arguments import parse_arguments
    from llama_moe.training.run import train

    argv = source_flags + [
        "--dataset", f"code={data}", "--output_dir", out, "--max_steps", str(args.steps),
        "--max_length", str(args.max_length), "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", "1e-5", "--logging_steps", "1", "--save_steps", str(10**6),
        "--validation_blocks", "1", "--peak_flops", str(peak), "--disable_tqdm", "true",
        "--bf16", str(args.bf16).lower(),
    ]
    options, config = parse_arguments(argv)
    start = time.perf_counter()
    train(options, config)
    wall = time.perf_counter() - start
    # Read the logs of the last run from the trainer state written with the final checkpoint.
    with open(os.path.join(out, f"checkpoint-{args.steps}", "trainer_state.json")) as handle:
        history = [e for e in json.load(handle)["log_history"] if "tokens_per_second" in e]
    timed = history[args.warmup :]  # the first steps include one-time work (allocations, first kernels)
    tokens_per_second = sum(e["tokens_per_second"] for e in timed) / len(timed)
    mfu = sum(e["mfu"] for e in timed) / len(timed)
    return {"model": label, "tokens_per_second": tokens_per_second, "mfu": mfu, "steps_timed": len(timed), "wall_s": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="logged steps left out of the averages")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (8 x 256 = 2048 tokens)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s (default: measured)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = args.peak_flops or matmul_peak(device)
    gguf = smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        data = corpus(os.path.join(tmp, "data"))
        dense = run("dense SmolLM2-135M", ["--model_name_or_path", gguf], data, os.path.join(tmp, "dense"), args, peak)
        moe = run(
            "MoE 8x top-2 (copy)",
            ["--upcycle_from", gguf, "--method", "copy", "--num_experts", "8", "--num_experts_per_tok", "2"],
            data, os.path.join(tmp, "moe"), args, peak,
        )
    ratio = moe["mfu"] / dense["mfu"]
    print(f"\ndevice {device}, peak {peak / 1e9:.1f} GFLOP/s ({'given' if args.peak_flops else 'measured matmul'}), "
          f"{args.steps} steps of {args.batch_size}x{args.max_length} tokens")
    print(f"{'model':<24}{'tokens/s':>12}{'MFU':>10}")
    for row in (dense, moe):
        print(f"{row['model']:<24}{row['tokens_per_second']:>12.1f}{row['mfu']:>10.2%}")
    print(f"MoE/dense MFU ratio: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "peak_flops": peak, "dense": dense, "moe": moe, "mfu_ratio": ratio}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
