"""llama_moe.evaluation: lm-eval-harness benchmarking, perplexity and routing analysis, plots, reports, Hub upload.

The optional dependencies (lm-eval, matplotlib: the `eval` extra) are imported inside the functions that need them,
so importing this package works without them; it never imports llama_moe.cli or llama_moe.training.
"""

from .lm_eval_runner import PRESETS, local_tasks_dir

__all__ = ["PRESETS", "local_tasks_dir"]
