"""`llama-moe upcycle BASE OUT`: turn a dense Llama checkpoint into an MoE checkpoint folder.

Parses arguments and calls `llama_moe.conversion.pipeline.run_upcycle`; must hold no conversion logic.
"""

import argparse
import shlex
import sys
from dataclasses import fields

from llama_moe.conversion.engines import ENGINES, engine_lines
from llama_moe.conversion.formats import FORMATS
from llama_moe.conversion.llama_moe_v1 import import_llama_moe_v1
from llama_moe.conversion.methods import METHODS, flag
from llama_moe.conversion.options import ROUTER_INIT_HELP, UpcycleOptions
from llama_moe.conversion.pipeline import run_upcycle


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per method, made from its `options` dataclass (a flag shared by several methods is
    listed under the first)."""
    seen = set()
    for name, method in METHODS.items():
        own = [f for f in fields(method.options) if f.name not in seen]
        if not own:
            continue
        group = parser.add_argument_group(f"{name} options")
        for f in own:
            seen.add(f.name)
            default = "" if f.default is None else f" (default {f.default})"
            group.add_argument(
                flag(f.name),
                dest=f.name,
                default=f.default,
                type=f.metadata["type"],
                choices=f.metadata["choices"],
                help=f.metadata["help"] + default,
            )


def build_parser() -> argparse.ArgumentParser:
    methods = "\n".join(f"  {name:<11} {m.summary}" for name, m in METHODS.items())
    parser = argparse.ArgumentParser(
        prog="llama-moe upcycle",
        description="Convert a dense Llama checkpoint (local folder, .gguf file or Hub id) into a Mixture-of-Experts "
        "checkpoint, streamed layer by layer.\n\nmethods:\n" + methods,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base", metavar="BASE", help="dense model: a Hugging Face folder, a .gguf file or a Hub id")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--method", default="copy", help=f"construction method: {', '.join(METHODS)} (default copy)")
    parser.add_argument("--num-experts", type=int, default=8, help="routed experts per MoE layer (default 8)")
    parser.add_argument(
        "--top-k", "--num-experts-per-tok", dest="top_k", type=int, default=2, help="experts per token (default 2)"
    )
    parser.add_argument(
        "--moe-layers", default="all", help="which layers become MoE: all, every-other, or a list like 0,2,5"
    )
    parser.add_argument(
        "--shared-experts",
        type=int,
        default=0,
        help="always-on shared experts, in expert widths ("
        + ", ".join(name for name, m in METHODS.items() if m.supports_shared_experts)
        + ")",
    )
    parser.add_argument(
        "--norm-topk-prob",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="renormalize the top-k routing weights (default: yes; granular's paper mode: no)",
    )
    parser.add_argument(
        "--routed-scaling-factor",
        type=float,
        default=None,
        help="scale of the routed output (default: random and clustering E/k, gradient the uncovered share, "
        "granular exact G, otherwise 1)",
    )
    parser.add_argument("--capacity-factor", type=float, default=None, help="expert capacity (default: dropless)")
    parser.add_argument(
        "--aux-loss-coef", type=float, default=0.01, help="load-balancing loss weight, per MoE layer (0.01)"
    )
    parser.add_argument(
        "--router-init",
        default=None,
        choices=list(ROUTER_INIT_HELP),
        help="router weights: "
        + "; ".join(f"{k} = {v}" for k, v in ROUTER_INIT_HELP.items())
        + " (default: fit for carve, normal otherwise)",
    )
    parser.add_argument(
        "--router-std",
        type=float,
        default=None,
        help="std of the normal router init (default: the model's initializer_range)",
    )
    parser.add_argument(
        "--calibration-data",
        nargs="+",
        default=None,
        metavar="SOURCE",
        help="calibration text for carve, gradient and --router-init fit, an equal share of tokens from each "
        "source: 'corpus' (the embedded standard-library sources and docs), 'generated' (text sampled from the "
        "dense model itself), FILE or NAME=FILE (text or JSONL) (default: corpus generated)",
    )
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=None,
        help="calibration tokens used (default 16384; gradient 4096)",
    )
    parser.add_argument("--dtype", default="auto", help="auto (the base model's), float32, bfloat16 or float16")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument(
        "--format",
        default="llama_moe",
        help=f"output architecture: {', '.join(FORMATS)} (default llama_moe); gguf: OUT is a .gguf file for llama.cpp "
        "in --dtype",
    )
    parser.add_argument(
        "--gguf-tokenizer-pre",
        default=None,
        help="gguf: llama.cpp's name of the tokenizer's pre-tokenizer where it is not detected",
    )
    parser.add_argument(
        "--from",
        dest="source_format",
        choices=["dense", "llama-moe-v1"],
        default="dense",
        help="dense (default): upcycle BASE; llama-moe-v1: import a released LLaMA-MoE v1 checkpoint as it is "
        "(same eval logits; the method options are ignored)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="refuse (before writing) unless this serving engine computes the output exactly as llama-moe does",
    )
    parser.add_argument(
        "--verify", action="store_true", help="run dense and MoE on real tokens: max logit difference, perplexities"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_method_options(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.source_format == "llama-moe-v1":
        out = import_llama_moe_v1(
            args.base, args.out, format_name=args.format, max_shard_size=args.max_shard_size, overwrite=args.overwrite
        )
        print(f"Imported LLaMA-MoE v1 checkpoint {args.base} -> {out} ({args.format})")
        return 0

    options = UpcycleOptions.from_kwargs(**{f.name: getattr(args, f.name) for f in fields(UpcycleOptions)})
    command = "llama-moe upcycle " + shlex.join(argv)
    result = run_upcycle(
        args.base,
        args.out,
        options,
        format=args.format,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        verify=args.verify,
        command=command,
        progress=not args.no_progress,
        engine=args.engine,
        gguf_tokenizer_pre=args.gguf_tokenizer_pre,
    )
    if result.verify:
        print(result.verify["summary"], file=sys.stderr)
    print("Serving engines:\n" + engine_lines(args.format, result.plan.moe_config))
    print(result.summary())
    return 0
