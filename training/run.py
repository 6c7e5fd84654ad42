"""`llama-moe train` as a library call: check the recipe, build model, data, mixture and callbacks, train, save.

Checks every user input before loading weights; it must not parse command lines (cli/train.py and
training/arguments.py do) nor hold training-loop logic (TRL's trainer runs the loop).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

import llama_moe.modeling  # noqa: F401  (registers llama_moe with the Auto classes)
from llama_moe.conversion import upcycle_in_memory
from llama_moe.conversion.atomic import recover_dirs, replace_dir
from llama_moe.conversion.model_path import locate_model

from .arguments import MoETrainingArguments, parse_mapping
from .callbacks import FreezeCallback, MixtureCallback, MoELoggingCallback, default_peak_flops, parse_freeze
from .cpu_memory import keep_freed_memory
from .data import DomainStream, check_domain, domain_size, parse_domains
from .distillation import Distiller
from .lora import check_lora_options, merged, with_lora
from .mixture import MixtureDataset, as_hf_iterable, initial_weights, load_state, save_state
from .trainer import STAGING_DIR, MoETrainer


def from_pretrained(auto_class, path: str, **kwargs):
    """`auto_class.from_pretrained` for a folder, a Hub id or a `.gguf` file (read from its folder)."""
    location = locate_model(path)
    if location.kind == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model {path!r} does not exist here, and Hub models cannot be fetched offline.")
    name_or_path, options = location.from_pretrained_arguments()
    return auto_class.from_pretrained(name_or_path, **options, **kwargs)


def plain_copy(model):
    """A model loaded from a .gguf file keeps a GGUF quantizer, which Trainer refuses to train and save_pretrained
    refuses to write: copy its (dequantized) weights into a fresh model of the same class."""
    if getattr(model, "hf_quantizer", None) is None:
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), strict=False, assign=True)
    fresh.tie_weights()
    for name, buffer in list(fresh.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (rotary inv_freq): take the loaded model's
            module_name, _, buffer_name = name.rpartition(".")
            source = model.get_submodule(module_name).get_buffer(buffer_name)
            fresh.get_submodule(module_name).register_buffer(buffer_name, source.clone(), persistent=False)
    return fresh


def _model_config(path: str, trust_remote_code: bool):
    return from_pretrained(AutoConfig, path, trust_remote_code=trust_remote_code)


def _resolve_resume(config) -> str | None:
    value = config.resume_from_checkpoint
    if value in (None, "", False, "false", "False"):
        return None
    if str(value).lower() == "true":
        last = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint true: no checkpoint-N folder in {config.output_dir}.")
        return last
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint: {value} does not exist.")
    return value


@dataclass
class TrainPlan:
    """What `validate` decided from the arguments alone, used as is by `train`."""

    specs: list
    weights: dict[str, float]  # the mixture's starting weights
    references: dict[str, float]  # given reference losses (dynamic sampling), or empty
    model_config: object
    resume: str | None
    routers_only: int
    frozen: list


def validate(options: MoETrainingArguments, config) -> TrainPlan:
    """Every check that needs no weights: domains, files, weights, model limits, resume, freezing, teacher."""
    if bool(options.model_name_or_path) == bool(options.upcycle_from):
        raise ValueError(
            "give exactly one of --model_name_or_path (a model to train) or --upcycle_from (a dense base)."
        )
    specs = parse_domains(options.dataset, config.dataset_text_field)
    names = [spec.name for spec in specs]
    recipe_weights = {spec.name: float(spec.weight) for spec in specs if spec.weight is not None}
    weights = {**recipe_weights, **parse_mapping(options.dataset_weights, "dataset_weights")}
    references = parse_mapping(options.reference_losses, "reference_losses")
    for what, mapping in (("dataset_weights", weights), ("reference_losses", references)):
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise ValueError(f"--{what} names unknown domain(s) {unknown}; the domains are {names}.")
    if references and sorted(references) != sorted(names):
        missing = sorted(set(names) - set(references))
        raise ValueError(f"--reference_losses must give every domain a loss; missing {missing}.")
    for spec in specs:
        check_domain(spec)
    # Weights now, so a bad recipe fails before any tokenizing (proportional reads only file sizes).
    start_weights = initial_weights(options.sampling, names, weights, lambda: [domain_size(spec) for spec in specs])
    model_config = _model_config(options.upcycle_from or options.model_name_or_path, config.trust_remote_code)
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and config.max_length > limit:
        raise ValueError(
            f"--max_length {config.max_length} is above the model's max_position_embeddings ({limit}); lower it."
        )
    resume = _resolve_resume(config)
    if options.distill_from:
        teacher_config = _model_config(options.distill_from, config.trust_remote_code)
        teacher_vocab = teacher_config.get_text_config().vocab_size
        student_vocab = model_config.get_text_config().vocab_size
        if teacher_vocab != student_vocab:
            raise ValueError(
                f"--distill_from {options.distill_from} has a vocabulary of {teacher_vocab} tokens, the student "
                f"{student_vocab}: distillation compares next-token distributions, so both need the same tokenizer."
            )

    check_lora_options(options)
    routers_only, frozen = parse_freeze(options.freeze)
    return TrainPlan(specs, start_weights, references, model_config, resume, routers_only, frozen)


def load_model(options: MoETrainingArguments, config):
    if options.upcycle_from:
        model = upcycle_in_memory(
            options.upcycle_from,
            method=options.method,
            num_experts=options.num_experts,
            top_k=options.num_experts_per_tok,
            seed=config.seed,
        )
    else:
        model = plain_copy(
            from_pretrained(
                AutoModelForCausalLM,
                options.model_name_or_path,
                dtype=torch.float32,
                trust_remote_code=config.trust_remote_code,
            )
        )
    if options.router_z_loss_coef is not None:
        if not hasattr(model.config, "router_z_loss_coef"):
            raise ValueError("--router_z_loss_coef is set but the model has no router z-loss (not a LlamaMoE model).")
        model.config.router_z_loss_coef = options.router_z_loss_coef
    return with_lora(model, options)


@torch.no_grad()
def held_out_losses(model, validation: dict[str, list[list[int]]], batch_size: int = 4) -> dict[str, float]:
    """Mean next-token loss of `model` on each domain's held-out blocks (the dynamic-sampling references)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = {}
    for name, blocks in validation.items():
        total = 0.0
        for start in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[start : start + batch_size], device=device)
            total += model(input_ids=ids, labels=ids, use_cache=False).loss.float().item() * len(ids)
        losses[name] = total / len(blocks)
    model.train(was_training)
    return losses


def load_teacher(options, config):
    """The frozen teacher of --distill_from, in --distill_dtype (auto: the training dtype), or None."""
    if not options.distill_from:
        return None

    if options.distill_dtype != "auto":
        dtype = getattr(torch, options.distill_dtype)
    else:
        dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
    teacher = plain_copy(
        from_pretrained(
            AutoModelForCausalLM, options.distill_from, dtype=dtype, trust_remote_code=config.trust_remote_code
        )
    )
    return Distiller(teacher, options.distill_weight, options.distill_temperature)


def _reference_losses(options, model, validation, references):
    if options.sampling != "dynamic" or references:
        return references

    source = options.reference_model or options.upcycle_from
    if source is None:
        print("[llama-moe train] dynamic sampling: no references given; using the initial model's held-out losses.")
        return held_out_losses(model, validation)
    reference = plain_copy(from_pretrained(AutoModelForCausalLM, source, dtype=torch.float32))
    losses = held_out_losses(reference, validation)
    del reference
    return losses


def remove_interrupted_saves(output_dir: str) -> None:
    """OUTPUT/.staging holds saves in progress only (finished ones are renamed out of it), so one found before
    training starts was left by an interrupted run: nothing in it is complete. A run killed while it swapped a
    finished save in (`replace_dir`) gets the complete folder back under its name."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    recover_dirs(output_dir)
    staging = os.path.join(output_dir, STAGING_DIR)
    if os.path.isdir(staging):
        shutil.rmtree(staging)
        print(f"[llama-moe train] removed {staging}: unfinished saves of an interrupted run.")


def check_processes_connected(config) -> None:
    """A launcher started several processes that accelerate did not join for training. Without GPUs it happens with
    `accelerate launch` of an FSDP/DeepSpeed config (no backend found: one process each) and with --ddp_backend gloo
    under FSDP (a process group, but DistributedType.NO: nothing wraps the model, gradients are never averaged).
    Every process would then train alone and overwrite the others' checkpoints."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    state = getattr(config, "distributed_state", None)
    kind = getattr(state, "distributed_type", None)
    if launched > 1 and (config.world_size == 1 or kind == DistributedType.NO):
        raise ValueError(
            f"{launched} processes were launched but accelerate did not connect them for training (world size "
            f"{config.world_size}, {kind}): no GPU backend was found. On CPU set ACCELERATE_USE_CPU=1 (DDP over gloo; "
            "accelerate ignores FSDP on CPU), or --ddp_backend gloo with a DeepSpeed config, or launch one process."
        )


def train(options: MoETrainingArguments, config) -> str:
    """Run continual pre-training; returns the folder of the final model (OUTPUT/final)."""
    plan = validate(options, config)
    check_processes_connected(config)
    remove_interrupted_saves(config.output_dir)
    if config.use_cpu or not torch.cuda.is_available():
        keep_freed_memory()  # each step re-allocates GiBs of activations and gradients: reuse, do not re-fault
    tokenizer = from_pretrained(
        AutoTokenizer, options.upcycle_from or options.model_name_or_path, trust_remote_code=config.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    streams = {
        spec.name: DomainStream(spec, tokenizer, config.max_length, options.validation_blocks) for spec in plan.specs
    }
    dataset = MixtureDataset(streams, plan.weights, seed=config.seed)
    validation = {name: stream.validation for name, stream in streams.items()}

    model = load_model(options, config)
    distiller = load_teacher(options, config)
    references = _reference_losses(options, model, validation, plan.references)
    mixture = MixtureCallback(dataset, options.sampling, references, options.eta, options.smoothing)
    if plan.resume:
        state = load_state(plan.resume)
        if state is None:
            raise FileNotFoundError(f"{plan.resume} has no mixture_state.json: it was not written by llama-moe train.")
        mixture.load_state(state)
    freezer = FreezeCallback(model, plan.routers_only, plan.frozen) if (plan.routers_only or plan.frozen) else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    moe_logging = MoELoggingCallback(
        model, config.max_length, world, options.peak_flops or default_peak_flops(config.bf16 or config.fp16)
    )
    eval_sets = {name: Dataset.from_dict({"input_ids": blocks}) for name, blocks in validation.items()}
    trainer = MoETrainer(
        model=model,
        args=config,
        train_dataset=as_hf_iterable(dataset),
        eval_dataset=eval_sets,
        processing_class=tokenizer,
        callbacks=[cb for cb in (moe_logging, mixture, freezer) if cb is not None],
        moe_logging=moe_logging,
        freezer=freezer,
        mixture=mixture,
        distiller=distiller,
    )
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and not trainer.is_fsdp_enabled and trainer.accelerator.is_main_process:
        print(  # accelerate 1.15 (state.py, AcceleratorState) picks FSDP only for GPU-like backends, never MULTI_CPU
            "[llama-moe train] warning: FSDP was requested but accelerate does not shard on CPU; this run is plain DDP "
            "(every process holds the whole model)."
        )
    trainer.train(resume_from_checkpoint=plan.resume)
    final = os.path.join(config.output_dir, "final")
    staged = os.path.join(config.output_dir, ".staging", "final")
    if options.use_peft:  # the final model is a plain checkpoint: the adapters merged into the weights
        trainer.model = trainer.model_wrapped = merged(trainer.accelerator.unwrap_model(trainer.model))
    trainer.save_model(staged)
    if trainer.args.should_save:
        save_state(staged, mixture.state_at(trainer.examples_consumed()))
        # The final folder is a Hub model, not a checkpoint: no pickled Trainer arguments (push refuses pickles).
        pickled_arguments = os.path.join(staged, "training_args.bin")
        if os.path.exists(pickled_arguments):
            os.remove(pickled_arguments)
        replace_dir(staged, final)  # a second run into the same folder swaps the old final model out
        staging_root = os.path.dirname(staged)
        card = os.path.join(staging_root, "README.md")  # TRL writes its model card beside the checkpoints
        if os.path.isfile(card):
            os.replace(card, os.path.join(config.output_dir, "README.md"))
        if not os.listdir(staging_root):
            os.rmdir(staging_root)
        loss = next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), math.nan)
        print(f"[llama-moe train] {trainer.state.global_step} steps, last loss {loss:.4f}; model written to {final}")
    trainer.accelerator.wait_for_everyone()
    return final
