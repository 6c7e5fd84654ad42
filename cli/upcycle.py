"""`llama-moe upcycle BASE OUT`: turn a dense Llama checkpoint into an MoE checkpoint folder.

Parses arguments and calls `llama_moe.conversion.upcycle.run_upcycle`; must hold no conversion logic.
"""

import argparse
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    from llama_moe.conversion.formats import EXPORTERS
    from llama_moe.conversion.methods import GRANULAR_SCALING, METHODS

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
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument(
        "--moe-layers", default="all", help="which layers become MoE: all, every-other, or a list like 0,2,5"
    )
    parser.add_argument(
        "--shared-experts", type=int, default=0, help="always-on shared experts (random, gradient: Sharing-Inter)"
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
    parser.add_argument("--aux-loss-coef", type=float, default=0.01, help="load-balancing loss weight (0.01)")
    parser.add_argument(
        "--router-init",
        default="normal",
        choices=["normal", "zeros", "centroids"],
        help="router weights: normal (seeded, std --router-std), zeros, or centroids (clustering, gradient)",
    )
    parser.add_argument("--router-std", type=float, default=None, help="std of the normal router init "
                        "(default: the model's initializer_range)")
    parser.add_argument(
        "--expert-noise", type=float, default=0.0, help="copy: add N(0, (x*std(W))^2) to each expert's copy"
    )
    parser.add_argument("--drop-ratio", type=float, default=0.5, help="drop: fraction re-initialized (0.5)")
    parser.add_argument("--granularity", type=int, default=1, help="granular: shards per FFN (G)")
    parser.add_argument(
        "--granular-scaling",
        default="paper",
        choices=list(GRANULAR_SCALING),
        help="granular: " + "; ".join(f"{k} = {v}" for k, v in GRANULAR_SCALING.items()),
    )
    parser.add_argument("--cluster-on", default="up", choices=["up", "gate"], help="clustering: rows to cluster")
    parser.add_argument("--calibration-data", default=None, help="gradient: text or JSONL file")
    parser.add_argument(
        "--expert-size", type=int, default=None, help="gradient: neurons per expert (default I / (E + shared))"
    )
    parser.add_argument(
        "--calibration-tokens", type=int, default=4096, help="gradient: calibration tokens used (default 4096)"
    )
    parser.add_argument("--dtype", default="auto", help="auto (the base model's), float32, bfloat16 or float16")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument(
        "--format", default="llama_moe", help=f"output architecture: {', '.join(EXPORTERS)} (default llama_moe)"
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
        "--verify", action="store_true", help="run dense and MoE on real tokens: max logit difference, perplexities"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


OPTION_FIELDS = (
    "method", "num_experts", "top_k", "moe_layers", "shared_experts", "norm_topk_prob", "routed_scaling_factor",
    "capacity_factor", "aux_loss_coef", "router_init", "router_std", "expert_noise", "drop_ratio", "granularity",
    "granular_scaling", "cluster_on", "calibration_data", "expert_size", "calibration_tokens", "dtype", "seed",
)  # fmt: skip


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.source_format == "llama-moe-v1":
        from llama_moe.conversion.llama_moe_v1 import import_llama_moe_v1

        out = import_llama_moe_v1(
            args.base, args.out, format_name=args.format, max_shard_size=args.max_shard_size, overwrite=args.overwrite
        )
        print(f"Imported LLaMA-MoE v1 checkpoint {args.base} -> {out} ({args.format})")
        return 0
    from llama_moe.conversion.options import UpcycleOptions
    from llama_moe.conversion.upcycle import run_upcycle

    options = UpcycleOptions.from_kwargs(**{name: getattr(args, name) for name in OPTION_FIELDS})
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
    )
    if result.verify:
        print(result.verify["summary"], file=sys.stderr)
    print(result.summary())
    return 0
