"""The `llama-moe` command: one table of subcommands, each a module with `main(argv) -> int`.

Only this layer turns user mistakes (ValueError, FileNotFoundError) into one clear line and exit code 2;
library code raises. Set LLAMA_MOE_DEBUG=1 to see the full traceback instead.
"""

import importlib
import os
import sys

# name -> (module under llama_moe.cli, one-line help). Modules are imported only when their command runs,
# so `llama-moe --help` stays fast.
SUBCOMMANDS = {
    "quickstart": ("quickstart", "Upcycle, train and evaluate a real small Llama on this machine; write a report."),
    "upcycle": ("upcycle", "Convert a dense Llama checkpoint into an MoE checkpoint (or import LLaMA-MoE v1)."),
    "sample": ("sample", "Write text sampled from a dense model, for calibration or replay in training."),
    "export": ("export", "Rewrite an MoE checkpoint as Mixtral or Qwen2-MoE for vLLM, llama.cpp and others."),
    "train": ("train", "Continual pre-training with TRL and accelerate."),
    "eval": ("eval", "Benchmark a model with lm-evaluation-harness."),
    "analyze": ("analyze", "Perplexity per domain, routing statistics, plots and a report."),
    "push": ("push", "Upload a model directory (weights, code, card) to the Hugging Face Hub."),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: llama-moe COMMAND [options]   (llama-moe COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"llama-moe: unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(f"llama_moe.cli.{SUBCOMMANDS[name][0]}")
    try:
        return module.main(rest) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        if os.environ.get("LLAMA_MOE_DEBUG"):
            raise
        print(f"llama-moe {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-moe {name}: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
