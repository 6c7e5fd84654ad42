"""MoETrainer: TRL's SFTTrainer with the model's own MoE loss, MoE logs, a NaN stop and atomic checkpoints.

Overrides only what TRL cannot do for us; it must not build data, models or arguments (training/run.py does).

Why the loss is the model's own: TRL 1.16 trains through its fused LM head, which adds Mixtral's switch balancing
loss whatever `aux_loss_type` says and never the router z-loss. So we call the model itself (as transformers'
Trainer does), take its token loss and router losses apart (`language_loss`, `aux_loss`, `z_loss`), add the
distillation term, and combine them with the model's own `add_router_losses`, divided for gradient accumulation.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from trl import SFTTrainer

from llama_moe.conversion.atomic import replace_dir

from ..modeling.modeling_llama_moe import add_router_losses
from .callbacks import MoEPrinterCallback, MoEProgressCallback
from .mixture import save_state

STAGING_DIR = ".staging"


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the last checkpoint on disk is the last good one."""


@contextlib.contextmanager
def plain_class(model):
    """FSDP2's fully_shard swaps the model's class for a generated `FSDP<Name>(FSDPModule, Name)` defined in torch's
    _fsdp_init.py. save_pretrained of remote code then writes `_fsdp_init.FSDPLlamaMoEForCausalLM` into auto_map and
    copies torch's _fsdp_*.py files instead of modeling_llama_moe.py (transformers strips the prefix only for
    `architectures`), and that checkpoint fails to load. save_pretrained gets the already gathered full state dict
    and runs no forward, so it runs under the plain class; the FSDP class is restored afterwards."""
    from torch.distributed.fsdp import FSDPModule  # here: torch builds without distributed support lack it

    wrapped = type(model)
    if not isinstance(model, FSDPModule):
        yield
        return
    model.__class__ = next(c for c in wrapped.__mro__[1:] if not issubclass(c, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = wrapped


class MoETrainer(SFTTrainer):
    def __init__(self, *args, moe_logging=None, freezer=None, mixture=None, distiller=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(MoEProgressCallback)
        if self.pop_callback(PrinterCallback) is not None:
            self.add_callback(MoEPrinterCallback)
        self.moe_logging, self.freezer, self.mixture, self.distiller = moe_logging, freezer, mixture, distiller
        self._router_metrics = {"aux_loss": [], "z_loss": [], "distill_loss": []}

    # -- loss --------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = self.model.training
        config = self.model.config.get_text_config()
        inputs = {**inputs, "use_cache": False}
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            inputs["num_items_in_batch"] = num_items_in_batch
        # Router losses only in training: evaluation measures the language-model loss that mixtures compare.
        router_outputs = training and getattr(config, "output_router_logits", False)
        if hasattr(config, "output_router_logits"):
            inputs["output_router_logits"] = router_outputs
        outputs = model(**inputs)
        if not training:
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        aux_loss, z_loss = getattr(outputs, "aux_loss", None), getattr(outputs, "z_loss", None)
        language_loss = getattr(outputs, "language_loss", None)
        if language_loss is None:  # another MoE class (Mixtral) adds its router losses to its loss as ours does
            language_loss = outputs.loss - add_router_losses(outputs.loss.new_zeros(()), aux_loss, z_loss, config)
        for name, value in (("aux_loss", aux_loss), ("z_loss", z_loss)):
            if value is not None:
                self._router_metrics[name].append(value.detach())
        if self.distiller is not None:
            # KL summed over tokens, divided like the token loss (by the accumulated batch's label count).
            kl_sum, count = self.distiller.kl_sum(inputs, outputs.logits)
            divisor = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
            self._router_metrics["distill_loss"].append((kl_sum / count.clamp(min=1)).detach())
            language_loss = language_loss + self.distiller.scale * kl_sum / divisor.to(kl_sum.device)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            language_loss = language_loss * self.accelerator.num_processes  # as Trainer.compute_loss; DDP averages
        # The token loss is already divided by the tokens of all accumulated micro-batches; the router losses are
        # per micro-batch means, so they are averaged over the accumulation steps (as TRL does).
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = add_router_losses(language_loss, aux_loss, z_loss, config, accumulation_steps=steps)
        if self.moe_logging is not None:
            self.moe_logging.add_tokens(int(inputs["input_ids"].numel()))
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Every process decides on the same gathered values, so all stop together (no rank left in a collective).
        if not torch.isfinite(self.accelerator.gather(loss.detach().reshape(1))).all():
            last = self._last_checkpoint()
            raise NonFiniteLossError(
                f"training loss is NaN or infinite at step {self.state.global_step + 1}; stopped before the optimizer "
                f"step. Last good checkpoint: {last or 'none yet'} (resume from it with a lower --learning_rate "
                "or --max_grad_norm)."
            )
        if self.freezer is not None:
            self.freezer.drop_grads(self.state.global_step)
        return loss

    # -- logs --------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            for name, values in self._router_metrics.items():
                if values:
                    value = self.accelerator.gather_for_metrics(torch.stack(values).mean().reshape(1)).mean()
                    logs[name] = round(value.item(), 6)
                values.clear()
            if self.moe_logging is not None:
                logs.update(self.moe_logging.metrics())
            if self.mixture is not None:
                logs.update(self.mixture.metrics())
        super().log(logs, start_time)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def examples_consumed(self) -> int:
        args = self.args
        return (
            self.state.global_step
            * args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * (self.accelerator.num_processes)
        )

    def _last_checkpoint(self) -> str | None:
        return get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None

    def _save(self, output_dir=None, state_dict=None):
        with plain_class(self.model):
            super()._save(output_dir, state_dict)

    def _save_checkpoint(self, model, trial):
        """Trainer writes checkpoint-N in place, so a crash mid-save leaves a folder that looks complete. We let it
        write under OUTPUT/.staging/checkpoint-N and rename that into place once every process is done."""
        finite = all(torch.isfinite(p.detach()).all() for p in model.parameters() if p.numel())
        if not torch.as_tensor(self.accelerator.gather(torch.tensor([finite], device=self.args.device))).all():
            raise NonFiniteLossError(
                f"model weights are NaN or infinite at step {self.state.global_step}; this checkpoint was not saved. "
                f"Last good checkpoint: {self._last_checkpoint() or 'none yet'} (resume from it with a lower "
                "--learning_rate or --max_grad_norm)."
            )
        final_dir = self.args.output_dir
        staging_root = os.path.join(final_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, target = os.path.join(staging_root, name), os.path.join(final_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir, self.args.save_total_limit = final_dir, limit
        if self.args.should_save and self.mixture is not None:
            save_state(staged, self.mixture.state_at(self.examples_consumed()))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            replace_dir(staged, target)  # re-saving a step (e.g. after a resume) swaps the old folder out
            if limit:
                rotate_checkpoints(
                    output_dir=final_dir,
                    save_total_limit=limit,
                    best_model_checkpoint=self.state.best_model_checkpoint,
                    use_mtime=True,
                )
        self.accelerator.wait_for_everyone()
