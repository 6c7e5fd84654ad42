"""`llama-moe export SRC OUT --format mixtral`: rewrite a llama_moe checkpoint (upcycled or trained) in another
architecture's layout so engines such as vLLM and llama.cpp load it natively.

Parses arguments and calls `llama_moe.conversion.export_checkpoint`; no conversion logic here.
"""

import argparse


def build_parser() -> argparse.ArgumentParser:
    from llama_moe.conversion.engines import ENGINES
    from llama_moe.conversion.formats import EXPORTERS

    formats = "\n".join(f"  {name:<10} {exporter.description}" for name, exporter in EXPORTERS.items())
    parser = argparse.ArgumentParser(
        prog="llama-moe export",
        description="Write a llama_moe checkpoint in another format, streamed tensor by tensor.\n\nformats:\n" + formats,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="llama_moe checkpoint folder (from upcycle or train)")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--format", required=True, help=f"target format: {', '.join(EXPORTERS)}")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="refuse (before writing) unless this serving engine computes the output exactly as llama-moe does",
    )
    return parser


def main(argv: list[str]) -> int:
    from llama_moe.conversion.engines import engine_lines
    from llama_moe.conversion.formats import export_checkpoint
    from llama_moe.modeling import LlamaMoEConfig

    args = build_parser().parse_args(argv)
    out = export_checkpoint(args.src, args.out, args.format, max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite, engine=args.engine)
    print("Serving engines:\n" + engine_lines(args.format, LlamaMoEConfig.from_pretrained(args.src)))
    print(f"Exported {args.src} -> {out} ({args.format})")
    return 0
