"""`llama-moe train`: continual pre-training with TRL and accelerate, from a YAML recipe and/or flags.

Parses and calls llama_moe.training; it must not hold training logic. Works alone, under torchrun and accelerate launch.
"""

from __future__ import annotations

import sys

from llama_moe.training.arguments import help_text, parse_arguments
from llama_moe.training.run import train


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "--help-all"):
        print(help_text(full=bool(argv) and argv[0] == "--help-all"), end="")
        return 0
    options, config = parse_arguments(argv)
    train(options, config)
    return 0


if __name__ == "__main__":
    # `torchrun -m llama_moe.cli.train ...`: errors become one line and exit code 2, as in `llama-moe train`.
    from llama_moe.cli.main import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
