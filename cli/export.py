"""`llama-moe export SRC OUT --format mixtral`: rewrite a llama_moe checkpoint (upcycled or trained) in another
architecture's layout so engines such as vLLM and llama.cpp load it natively.

Parses arguments and calls `llama_moe.conversion.export_checkpoint`; no conversion logic here.
"""

import argparse

from llama_moe.conversion.engines import ENGINES, engine_lines
from llama_moe.conversion.formats import EXPORTERS, FORMATS, export_checkpoint
from llama_moe.conversion.gguf_export import export_gguf
from llama_moe.modeling import LlamaMoEConfig


def build_parser() -> argparse.ArgumentParser:
    formats = "\n".join(f"  {name:<10} {exporter.description}" for name, exporter in EXPORTERS.items())
    formats += "\n  gguf       one GGUF file that llama.cpp computes exactly as we do (architecture from the routing)"
    parser = argparse.ArgumentParser(
        prog="llama-moe export",
        description="Write a llama_moe checkpoint in another format, streamed tensor by tensor.\n\nformats:\n"
        + formats,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="llama_moe checkpoint folder (from upcycle or train)")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help=f"target format: {', '.join(FORMATS)} (gguf: OUT is a .gguf file for llama.cpp)",
    )
    parser.add_argument(
        "--outtype",
        default=None,
        choices=["f32", "f16", "bf16"],
        help="gguf: tensor type of the file (default: the checkpoint's dtype)",
    )
    parser.add_argument(
        "--gguf-tokenizer-pre",
        default=None,
        help="gguf: llama.cpp's name of the tokenizer's pre-tokenizer where it is not detected",
    )
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
    args = build_parser().parse_args(argv)
    if args.format == "gguf":
        out = export_gguf(
            args.src,
            args.out,
            outtype=args.outtype,
            tokenizer_pre=args.gguf_tokenizer_pre,
            overwrite=args.overwrite,
            engine=args.engine,
        )
    else:
        out = export_checkpoint(
            args.src,
            args.out,
            args.format,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            engine=args.engine,
        )
    print("Serving engines:\n" + engine_lines(args.format, LlamaMoEConfig.from_pretrained(args.src)))
    print(f"Exported {args.src} -> {out} ({args.format})")
    return 0
