"""`llama-moe sample BASE OUT.jsonl`: text sampled from a dense model, for calibration (`llama-moe upcycle
--calibration-data generated=OUT.jsonl`) or as a replay domain in training (`llama-moe train --dataset
generated=OUT.jsonl`), so an upcycled model keeps what its parent knows beyond the user's data.

Parses arguments and calls llama_moe.conversion.generated_text; no sampling logic here.
"""

import argparse

from llama_moe.conversion.generated_text import write_generated_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-moe sample",
        description="Sample text from a dense model (temperature 1, from its start token) into a JSONL file with a "
        "'text' field per document. Needs the whole model in memory once.",
    )
    parser.add_argument("base", metavar="BASE", help="dense model: folder, .gguf file or Hub id")
    parser.add_argument("out", metavar="OUT", help="output .jsonl file")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens to sample (default 16384)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out = write_generated_text(args.base, args.out, args.tokens, seed=args.seed, overwrite=args.overwrite)
    print(f"llama-moe sample: {args.tokens} tokens sampled from {args.base} -> {out}")
    return 0
