"""Command-line and recipe arguments of `llama-moe train`: our options plus TRL's SFTConfig, parsed together.

Parses and normalizes only (NAME=VALUE lists, forced trainer settings); it must not load models or read data.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, fields

import torch
from transformers import HfArgumentParser
from transformers.trainer_utils import IntervalStrategy
from trl import SFTConfig, TrlParser

SAMPLING_METHODS = ("static", "proportional", "uniform", "dynamic")
DISTILL_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class MoETrainingArguments:
    """Options of `llama-moe train` that TRL's `SFTConfig` does not have. Flags keep these names."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model directory or Hub id to train (omit with --upcycle_from)."}
    )
    dataset: list[str] = field(
        default_factory=list,
        metadata={"help": "Training domain NAME=PATH (repeatable): text file, folder, .jsonl, .parquet or Hub name."},
    )
    sampling: str = field(
        default="static", metadata={"help": f"Mixture sampling, one of {', '.join(SAMPLING_METHODS)}."}
    )
    dataset_weights: str | None = field(
        default=None, metadata={"help": "Domain weights NAME=W,... (static/dynamic start; normalized)."}
    )
    reference_losses: str | None = field(
        default=None, metadata={"help": "Dynamic sampling: per-domain reference losses NAME=L,..."}
    )
    reference_model: str | None = field(
        default=None,
        metadata={
            "help": "Dynamic sampling: model whose held-out losses are the references (default: the dense "
            "base with --upcycle_from, else the initial model)."
        },
    )
    eta: float = field(default=1.0, metadata={"help": "Dynamic sampling step size."})
    smoothing: float = field(default=1e-4, metadata={"help": "Dynamic sampling: mix this much of uniform in."})
    validation_blocks: int = field(
        default=4, metadata={"help": "Blocks of max_length tokens held out per domain for validation."}
    )
    freeze: str | None = field(
        default=None,
        metadata={
            "help": "Comma list: routers_only:N (train only routers for N steps), and/or groups kept frozen: "
            "attention, embeddings, lm_head, norms, experts, routers."
        },
    )
    upcycle_from: str | None = field(
        default=None, metadata={"help": "Dense base model to upcycle in memory before training."}
    )
    method: str = field(default="copy", metadata={"help": "Upcycling method (with --upcycle_from)."})
    num_experts: int = field(default=8, metadata={"help": "Experts per MoE layer (with --upcycle_from)."})
    num_experts_per_tok: int = field(
        default=2, metadata={"help": "Top-k (with --upcycle_from); --top_k is accepted too.", "aliases": ["--top_k"]}
    )
    distill_from: str | None = field(
        default=None,
        metadata={
            "help": "Teacher for distillation (folder, .gguf or Hub id; usually the dense base): adds "
            "distill_weight * T^2 * KL(teacher || student) of the next-token distributions to the loss."
        },
    )
    distill_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation KL term."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of the distillation."})
    distill_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen teacher: auto (the training dtype), float32, bfloat16 or float16. "
            "bfloat16 makes the teacher's forward about 3x cheaper on CPUs with AMX or AVX512-BF16; the KL "
            "itself is computed in float32."
        },
    )
    router_z_loss_coef: float | None = field(
        default=None, metadata={"help": "Override the model's router z-loss coefficient."}
    )
    peak_flops: float | None = field(
        default=None, metadata={"help": "Peak FLOP/s of one device for MFU (default: known GPUs; none on CPU)."}
    )
    # LoRA, with the names of TRL's ModelConfig (training/lora.py); the final model has the adapters merged.
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the adapter scale is alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules that get adapters (default: attention and FFN projections)."}
    )
    lora_target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "Parameters that get adapters (default for MoE models: mlp.experts.gate_up_proj and "
            "mlp.experts.down_proj, the fused routed experts)."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full besides the adapters (default for MoE: mlp.gate)."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA scale alpha / sqrt(r)."})


def parse_mapping(value, what: str) -> dict[str, float]:
    """`"a=1,b=2"` or a YAML mapping -> {"a": 1.0, "b": 2.0}; the error names `what`."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        items = value.items()
    else:
        items = []
        for part in str(value).split(","):
            if "=" not in part:
                raise ValueError(f"--{what}: {part!r} is not NAME=NUMBER (example: --{what} code=0.7,prose=0.3).")
            name, number = part.split("=", 1)
            items.append((name.strip(), number.strip()))
    result = {}
    for name, number in items:
        try:
            result[str(name)] = float(number)
        except (TypeError, ValueError):
            raise ValueError(f"--{what}: value {number!r} for {name!r} is not a number.") from None
    return result


def _merge_repeated(argv: list[str], flag: str) -> list[str]:
    """argparse keeps only the last `--dataset a b`; merge every occurrence into one."""
    values, rest, index = [], [], 0
    while index < len(argv):
        if argv[index] == flag:
            index += 1
            while index < len(argv) and not argv[index].startswith("--"):
                values.append(argv[index])
                index += 1
        elif argv[index].startswith(flag + "="):
            values.append(argv[index].split("=", 1)[1])
            index += 1
        else:
            rest.append(argv[index])
            index += 1
    return rest + ([flag, *values] if values else [])


def build_parser() -> TrlParser:
    parser = TrlParser((MoETrainingArguments, SFTConfig), prog="llama-moe train")
    # Defaults that suit continual pre-training; recipes and flags override them.
    # TRL defaults to bf16 (refused on a machine without a GPU) and gradient checkpointing; recipes turn them on.
    parser.set_defaults(
        report_to="none",
        logging_steps=10,
        save_steps=500,
        output_dir="llama-moe-train",
        bf16=torch.cuda.is_available(),
        gradient_checkpointing=False,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator (a warning per run on CPU)
    )
    return parser


# Inherited TRL/transformers flags that a continual pre-training run usually sets, shown by the short --help.
COMMON_INHERITED = (
    "output_dir",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "weight_decay",
    "max_grad_norm",
    "bf16",
    "gradient_checkpointing",
    "logging_steps",
    "eval_strategy",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "resume_from_checkpoint",
    "seed",
    "report_to",
)


def help_text(full: bool = False) -> str:
    """`llama-moe train --help`: --config, our options, then the common inherited ones (all with --help-all)."""
    if full:
        return build_parser().format_help()
    ours = HfArgumentParser((MoETrainingArguments,), prog="llama-moe train").format_help()
    ours = ours.split("\n\n", 1)[1] if "\n\n" in ours else ours  # drop argparse's usage line (ours is below)
    inherited = {f.name: f for f in fields(SFTConfig)}
    lines = [
        "usage: llama-moe train [--config RECIPE.yaml] [--flag value ...]",
        "",
        "Continual pre-training of an MoE checkpoint with TRL and accelerate. A YAML recipe gives defaults",
        "(see training/recipes/), flags override it; flags keep TRL/transformers names.",
        "",
        "  --config RECIPE.yaml  defaults from a YAML recipe of any of the flags below",
        "",
        "llama-moe options:",
        ours.replace("options:\n", "").rstrip(),
        "",
        "common TRL/transformers options (all of them: llama-moe train --help-all):",
    ]
    for name in COMMON_INHERITED:
        help_ = " ".join(str(inherited[name].metadata.get("help", "")).split()).replace("%%", "%")
        lines.append(f"  --{name:<30} {help_[:100] + ('...' if len(help_) > 100 else '')}")
    return "\n".join(lines) + "\n"


def default_eval_steps(max_steps: int) -> int:
    """Evaluation interval when dynamic sampling needs one and none was given: ten weight updates per run."""
    return max(1, max_steps // 10)


def parse_arguments(argv: list[str]) -> tuple[MoETrainingArguments, SFTConfig]:
    """Parse `--config recipe.yaml` (defaults) and flags (overrides) into our options and TRL's SFTConfig."""
    argv = _merge_repeated(list(argv), "--dataset")
    if "--config" in argv:
        path = argv[argv.index("--config") + 1] if argv.index("--config") + 1 < len(argv) else ""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config: recipe file {path!r} does not exist.")
    try:
        with warnings.catch_warnings():
            # transformers >= 5.25 renamed gradient_checkpointing to activation_checkpointing and warns whenever the
            # old name is set, which TRL's config always does (its default is True): nothing a user can act on.
            warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
            options, config = build_parser().parse_args_and_config(argv)
    except ValueError as error:
        if "Unknown arguments from config file" in str(error):
            raise ValueError(f"recipe has keys that are not llama-moe train options: {error}") from None
        raise
    if options.sampling not in SAMPLING_METHODS:
        raise ValueError(f"--sampling {options.sampling!r} is unknown; choose one of {list(SAMPLING_METHODS)}.")
    if options.validation_blocks < 1:
        raise ValueError("--validation_blocks must be >= 1 (each domain needs a held-out split).")
    if config.max_steps is None or config.max_steps <= 0:
        raise ValueError("--max_steps must be set (> 0): training streams data, so there are no epochs to count.")
    if options.sampling == "dynamic" and str(config.eval_strategy) in ("no", "IntervalStrategy.NO"):
        config.eval_strategy, config.eval_steps, config.do_eval = (
            IntervalStrategy.STEPS,
            default_eval_steps(config.max_steps),
            True,
        )
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"[llama-moe train] --sampling dynamic updates the mixture at each evaluation: evaluating every "
                f"{config.eval_steps} steps (choose with --eval_strategy steps --eval_steps N)."
            )
    if config.max_length is None:
        raise ValueError("--max_length must be set: it is the length of the packed training blocks.")
    if options.distill_weight < 0:
        raise ValueError(f"--distill_weight must be >= 0, got {options.distill_weight}.")
    if options.distill_temperature <= 0:
        raise ValueError(f"--distill_temperature must be > 0, got {options.distill_temperature}.")
    if options.distill_dtype not in DISTILL_DTYPES:
        raise ValueError(f"--distill_dtype must be one of {', '.join(DISTILL_DTYPES)}, got {options.distill_dtype!r}.")
    force_streaming_settings(config)
    return options, config


def force_streaming_settings(config: SFTConfig) -> None:
    """Settings our streaming, resumable mixture needs, whatever the recipe says."""
    config.packing = False  # we pack ourselves (training/data.py), in a streaming and resumable way
    config.dataset_kwargs = {**(config.dataset_kwargs or {}), "skip_prepare_dataset": True}
    config.remove_unused_columns = False
    config.dataloader_num_workers = 0  # the mixture's position lives in the main process
    config.ignore_data_skip = True  # the mixture restores its own position; no replay of skipped batches
    config.logging_nan_inf_filter = False  # a NaN must show, not be averaged away
    config.eval_packing = False
