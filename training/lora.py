"""LoRA recovery with TRL's own PEFT flags (`--use_peft`, `--lora_r`, ...): adapters on attention, dense and shared
FFNs, and on the fused routed experts through PEFT's `target_parameters`; routers train in full.

Checkpoints hold the adapter (the Trainer saves a PEFT model so, and resumes from it); the final model is the
adapter merged into the weights, a plain checkpoint that push, export and the engines take as any other. Must not
run the training loop.
"""

from __future__ import annotations

import importlib.util

# What LoRA adapts when no targets are given: every projection of attention and of the dense / shared FFNs, both
# fused tensors of the routed experts (PEFT >= 0.22 wraps 3-D parameters), and the routers in full (small, and
# routing is what an upcycled model most needs to learn).
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
DEFAULT_MODULES_TO_SAVE = ["mlp.gate"]


def check_lora_options(options) -> None:
    """Before any model is loaded: PEFT is installed and the flags fit together."""
    if not options.use_peft:
        return
    if importlib.util.find_spec("peft") is None:
        raise ValueError("--use_peft needs PEFT: pip install 'llama-moe[lora]' (or pip install peft).")
    if options.lora_r < 1:
        raise ValueError(f"--lora_r must be >= 1, got {options.lora_r}.")
    if options.freeze:
        raise ValueError(
            "--freeze and --use_peft do not combine: with LoRA only the adapters (and the routers) train; choose one."
        )


def lora_config(options, model):
    from peft import LoraConfig

    moe = hasattr(model.config, "num_local_experts")
    return LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=options.lora_target_modules or DEFAULT_TARGET_MODULES,
        target_parameters=options.lora_target_parameters or (DEFAULT_TARGET_PARAMETERS if moe else None),
        modules_to_save=options.lora_modules_to_save or (DEFAULT_MODULES_TO_SAVE if moe else None),
        use_rslora=options.use_rslora,
        task_type="CAUSAL_LM",
    )


def with_lora(model, options):
    """The model wrapped with fresh LoRA adapters (`--use_peft`), or the model itself."""
    if not options.use_peft:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(options, model))


def merged(model):
    """The plain model with the adapters merged into its weights (a PEFT model), or the model itself."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
