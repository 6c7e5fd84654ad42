"""`llama-moe eval`: benchmark a model (and optionally its dense base) with lm-evaluation-harness.

Parses arguments and calls llama_moe.evaluation.lm_eval_runner; holds no evaluation logic of its own.
"""

import argparse
import os
import re
from pathlib import Path

from llama_moe.cli.extras import require
from llama_moe.evaluation import lm_eval_runner as runner
from llama_moe.evaluation.lm_eval_runner import LOCAL_TASK_TAG, PRESETS
from llama_moe.evaluation.loading import check_model_path


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-moe eval",
        description="Benchmark MODEL (a model directory or Hub id, loaded with trust_remote_code) with "
        f"lm-evaluation-harness. Local offline tasks: {LOCAL_TASK_TAG}. Presets need the Hub for their data.",
    )
    parser.add_argument("model", help="model directory or Hub id")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        help="lm-eval task names, comma or space separated; NAME:N fixes NAME's few-shot count",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a published benchmark set (LLaMA-MoE v1 or 'Llama 3 Meets MoE'), with its per-task few-shot counts",
    )
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot count for tasks without NAME:N")
    parser.add_argument("--limit", type=_limit, default=None, help="examples per task (a fraction if < 1)")
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of extra lm-eval task YAMLs (repeatable)",
    )
    parser.add_argument("--output", default=None, help="output folder (default: MODEL/eval for a local MODEL)")
    parser.add_argument(
        "--compare",
        metavar="BASE",
        default=None,
        help="also evaluate this dense base (directory, Hub id or .gguf) and write one table with deltas",
    )
    parser.add_argument("--batch-size", default="1", help="batch size or 'auto'")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=1234)
    return parser


def default_output(model: str) -> Path:
    if os.path.isdir(model):
        return Path(model) / "eval"
    return Path("eval-results") / re.sub(r"[^A-Za-z0-9._-]+", "--", model)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    require("lm_eval", command="llama-moe eval")
    for model in filter(None, (args.model, args.compare)):  # before lm-eval builds its tasks (seconds)
        check_model_path(model)
    specs = runner.parse_task_specs(args.tasks, args.preset, args.num_fewshot)
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    manager = runner.build_task_manager(specs, args.include_path)
    runner.check_tasks_reachable(manager, specs)
    options = dict(
        limit=args.limit,
        device=args.device,
        dtype=args.dtype,
        batch_size=batch_size,
        seed=args.seed,
        task_manager=manager,
    )
    base = runner.evaluate(args.compare, specs, **options) if args.compare else None
    run = runner.evaluate(args.model, specs, **options)
    output = Path(args.output) if args.output else default_output(args.model)
    paths = runner.write_results(output, run, base)
    print(paths["markdown"].read_text())
    print(
        f"llama-moe eval: {len(run.scores)} task result(s) for {args.model}"
        f"{' vs ' + args.compare if base else ''} -> {paths['json']} and {paths['markdown']}"
    )
    return 0
