"""Training throughput of upcycled SmolLM2-135M (8 experts, top-2, copy) against dense SmolLM2-135M, same data.

Measures tokens/s and MFU (FLOPs from ACTIVE parameters) through the real `llama-moe train` pipeline; it is a
benchmark, not a test: nothing is asserted. Run: python benchmarks/train_throughput.py [--steps 8] [--rounds 2]

The two models train in alternating rounds (dense, MoE, dense, MoE, ...), each round a fresh run of `--steps`
steps whose first `--warmup` are left out, and each model's rate is the median of all its timed steps: on a shared
machine the speed drifts by 10-30% over minutes, and alternating makes both models see the same drift.

On CPU there is no vendor peak, so the "peak" is the best FLOP/s this machine reaches on a large fp32 matmul
(measured first); the MoE/dense MFU ratio does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def matmul_peak(device: str, size: int = 2048, repeats: int = 10) -> float:
    """The best rate of `repeats` timed matmuls (the best, not the mean: a descheduled repetition is not the peak)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def corpus(folder: str) -> str:
    import shutil
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    os.makedirs(folder, exist_ok=True)
    for name in ("argparse.py", "typing.py", "inspect.py", "pathlib.py", "dataclasses.py"):
        shutil.copy(os.path.join(stdlib, name), folder)
    return folder


def run(source_flags: list[str], data: str, out: str, args, peak: float) -> dict:
    from llama_moe.training.arguments import parse_arguments
    from llama_moe.training.run import train

    argv = source_flags + [
        "--dataset",
        f"code={data}",
        "--output_dir",
        out,
        "--max_steps",
        str(args.steps),
        "--max_length",
        str(args.max_length),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--learning_rate",
        "1e-5",
        "--logging_steps",
        "1",
        "--save_steps",
        str(10**6),
        "--validation_blocks",
        "1",
        "--peak_flops",
        str(peak),
        "--disable_tqdm",
        "true",
        "--bf16",
        str(args.bf16).lower(),
    ]
    options, config = parse_arguments(argv)
    start = time.perf_counter()
    train(options, config)
    wall = time.perf_counter() - start
    # Read the logs of the last run from the trainer state written with the final checkpoint.
    with open(os.path.join(out, f"checkpoint-{args.steps}", "trainer_state.json")) as handle:
        history = [e for e in json.load(handle)["log_history"] if "tokens_per_second" in e]
    timed = history[args.warmup :]  # the first steps include one-time work (allocations, first kernels)
    return {
        "tokens_per_second": [e["tokens_per_second"] for e in timed],
        "mfu": [e["mfu"] for e in timed],
        "wall_s": wall,
    }


def summarize(label: str, rounds: list[dict]) -> dict:
    rates = [rate for r in rounds for rate in r["tokens_per_second"]]
    mfus = [mfu for r in rounds for mfu in r["mfu"]]
    return {
        "model": label,
        "tokens_per_second": statistics.median(rates),
        "mfu": statistics.median(mfus),
        "tokens_per_second_range": [min(rates), max(rates)],
        "steps_timed": len(rates),
        "round_medians": [statistics.median(r["mfu"]) for r in rounds],
        "wall_s": sum(r["wall_s"] for r in rounds),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="logged steps of each round left out")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per model (dense, MoE, dense, ...)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (8 x 256 = 2048 tokens)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s (default: measured)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = args.peak_flops or matmul_peak(device)
    gguf = smollm2_gguf()
    models = {
        "dense SmolLM2-135M": ["--model_name_or_path", gguf],
        "MoE 8x top-2 (copy)": [
            "--upcycle_from",
            gguf,
            "--method",
            "copy",
            "--num_experts",
            "8",
            "--num_experts_per_tok",
            "2",
        ],
    }
    rounds = {label: [] for label in models}
    with tempfile.TemporaryDirectory() as tmp:
        data = corpus(os.path.join(tmp, "data"))
        for round_index in range(args.rounds):
            for number, (label, flags) in enumerate(models.items()):
                out = os.path.join(tmp, f"run-{round_index}-{number}")
                rounds[label].append(run(flags, data, out, args, peak))
                shutil.rmtree(out, ignore_errors=True)
    dense, moe = (summarize(label, rounds[label]) for label in models)
    ratio = moe["mfu"] / dense["mfu"]
    per_round = [m / d for m, d in zip(moe["round_medians"], dense["round_medians"])]
    print(
        f"\ndevice {device}, peak {peak / 1e9:.1f} GFLOP/s ({'given' if args.peak_flops else 'best matmul'}), "
        f"{args.rounds} alternating rounds of {args.steps} steps of {args.batch_size}x{args.max_length} tokens, "
        f"{args.warmup} warm-up steps per round not timed"
    )
    print(f"{'model':<24}{'tokens/s (median)':>18}{'range':>18}{'MFU':>9}")
    for row in (dense, moe):
        low, high = row["tokens_per_second_range"]
        print(f"{row['model']:<24}{row['tokens_per_second']:>18.1f}{f'{low:.1f}-{high:.1f}':>18}{row['mfu']:>9.1%}")
    print(f"MoE/dense MFU ratio: {ratio:.3f} (per round: {', '.join(f'{r:.3f}' for r in per_round)})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "device": device,
                    "peak_flops": peak,
                    "dense": dense,
                    "moe": moe,
                    "mfu_ratio": ratio,
                    "mfu_ratio_per_round": per_round,
                },
                handle,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
