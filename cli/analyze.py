"""`llama-moe analyze`: perplexity per domain, routing statistics, parameters and speed; plots and report.md.

Parses arguments and calls llama_moe.evaluation (analysis -> plots -> report); no analysis logic here.
"""

import argparse
import json
import os
from pathlib import Path

from llama_moe.cli.extras import require
from llama_moe.evaluation.analysis import parse_data_args, run_analysis
from llama_moe.evaluation.plots import make_plots
from llama_moe.evaluation.report import write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-moe analyze",
        description="Per-domain perplexity and routing statistics of an MoE model (optionally against its dense "
        "base), parameter counts and generation speed; writes analysis.json, PNG plots and report.md.",
    )
    parser.add_argument("model", help="MoE model directory, Hub id or .gguf")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a domain: text file, .jsonl with a 'text' field, or folder of text files (repeatable)",
    )
    parser.add_argument(
        "--no-unseen-domain",
        action="store_true",
        help="leave out the unseen domain (English prose that no calibration or training of "
        "llama-moe reads, shipped with it), which is analyzed by default",
    )
    parser.add_argument(
        "--cloze-items",
        type=int,
        default=300,
        help="items of the unseen domain's cloze task scored with lm-eval (default 300, about a "
        "minute per model on 2 CPU cores; 0 skips)",
    )
    parser.add_argument("--base", default=None, help="dense base model to compare with (directory, Hub id or .gguf)")
    parser.add_argument("--output", default=None, help="output folder (default: MODEL/analysis for a local MODEL)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per domain (default 4096)")
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per scored block (default min(512, max_position_embeddings))",
    )
    parser.add_argument("--no-speed", action="store_true", help="skip the generation speed measurement")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per speed measurement")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for the speed measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (default: the checkpoint's)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    require("matplotlib", *(["lm_eval"] if args.cloze_items else []), command="llama-moe analyze")
    domains = parse_data_args(args.data, allow_none=not args.no_unseen_domain)
    if args.output:
        output = Path(args.output)
    elif os.path.isdir(args.model):
        output = Path(args.model) / "analysis"
    else:
        output = Path("analysis") / Path(args.model).name
    analysis_json = run_analysis(
        args.model,
        domains,
        output,
        base_path=args.base,
        max_tokens=args.max_tokens,
        block_size=args.block_size,
        device=args.device,
        dtype=args.dtype,
        speed=not args.no_speed,
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        unseen=not args.no_unseen_domain,
        cloze_items=args.cloze_items,
    )
    figures = make_plots(analysis_json)
    report = write_report(analysis_json)
    analyzed = len(json.loads(Path(analysis_json).read_text())["data"])
    print(f"llama-moe analyze: {analyzed} domain(s), {len(figures)} figure(s) -> {analysis_json}, {report}")
    return 0
