"""llama_moe.training: continual pre-training of (MoE) causal LMs on TRL's SFTTrainer and accelerate.

`parse_arguments(argv)` reads a YAML recipe and flags; `train(options, config)` runs it. No training loop here.
"""

from .arguments import MoETrainingArguments, parse_arguments
from .run import train

__all__ = ["MoETrainingArguments", "parse_arguments", "train"]
