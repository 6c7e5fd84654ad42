"""Trainer callbacks: MoE statistics and throughput for the logs, staged freezing, and mixture bookkeeping.

Each callback only observes the model or edits requires_grad/gradients; none of them runs a training step,
reads data or writes checkpoints (training/trainer.py does).
"""

from __future__ import annotations

import math
import re
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from llama_moe.modeling.parameters import model_parameter_counts

from .mixture import dynamic_update

# ---------------------------------------------------------------------------------------------------------------
# MoE statistics and throughput

# bf16 dense peak FLOP/s of one device, for MFU. Anything else: pass --peak_flops.
PEAK_FLOPS_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def default_peak_flops(bf16: bool) -> float | None:
    if not (bf16 and torch.cuda.is_available()):
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((value for key, value in PEAK_FLOPS_BF16.items() if key in name), None)


def _is_moe_block(module) -> bool:
    return hasattr(module, "last_tokens_per_expert") and hasattr(module, "experts") and hasattr(module, "top_k")


def active_parameters(model) -> int:
    """Parameters whose matmuls one token goes through, for MFU: the project's active count
    (llama_moe.modeling.parameters) without the embedding lookup, which is a gather, not a matmul. A tied LM head
    is the same matrix and is a matmul, so with tied embeddings nothing is taken off."""
    counts = model_parameter_counts(model)
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    return counts["active"] - (0 if tied else counts["embedding"])


def flops_per_token(model, sequence_length: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6 N_active + 12 L H T (attention scores and values)."""
    config = model.config
    return 6 * active_parameters(model) + 12 * config.num_hidden_layers * config.hidden_size * sequence_length


def load_statistics(tokens_per_expert: dict[int, torch.Tensor], dropped: dict[int, float], top_k: int) -> dict:
    """Per MoE layer: fraction of routed slots per expert, their coefficient of variation and normalized entropy;
    over layers: mean CV and the fraction of slots dropped by the capacity limit."""
    logs, cvs, total_slots, total_dropped = {}, [], 0.0, 0.0
    for layer, counts in sorted(tokens_per_expert.items()):
        counts = counts.double()
        routed = counts.sum().item()
        slots = routed + dropped.get(layer, 0.0)
        if slots <= 0:
            continue
        fraction = counts / max(routed, 1.0)
        cv = (fraction.std(unbiased=False) / fraction.mean()).item()
        nonzero = fraction[fraction > 0]
        entropy = -(nonzero * nonzero.log()).sum().item() / math.log(len(fraction)) if len(fraction) > 1 else 1.0
        for expert, value in enumerate(fraction.tolist()):
            logs[f"moe/layer_{layer}/expert_{expert}"] = round(value, 4)
        logs[f"moe/layer_{layer}/load_cv"] = round(cv, 4)
        logs[f"moe/layer_{layer}/load_entropy"] = round(entropy, 4)
        cvs.append(cv)
        total_slots += slots
        total_dropped += dropped.get(layer, 0.0)
    if cvs:
        logs["moe/load_cv_mean"] = sum(cvs) / len(cvs)
        logs["moe/load_cv_max"] = max(cvs)
        logs["moe/dropped_fraction"] = total_dropped / total_slots
    return logs


class MoELoggingCallback(TrainerCallback):
    """Accumulates expert load over every training forward pass (forward hooks on the MoE blocks) and the token
    count between two logging steps; `metrics()` turns them into log entries and starts a new window."""

    def __init__(self, model, sequence_length: int, num_processes: int = 1, peak_flops: float | None = None):
        self.model, self.num_processes, self.peak_flops = model, num_processes, peak_flops
        self.flops_per_token = flops_per_token(model, sequence_length)
        self.active_parameters = active_parameters(model)
        self._counts, self._dropped, self._handles = {}, {}, []
        self._tokens, self._start = 0, None
        blocks = [(name, m) for name, m in model.named_modules() if _is_moe_block(m)]
        self.top_k = blocks[0][1].top_k if blocks else 0
        for name, module in blocks:
            layer = int(re.search(r"layers\.(\d+)\.", name + ".").group(1)) if "layers." in name else len(self._handles)
            self._handles.append(module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def record(module, inputs, output):
            if not module.training or module.last_tokens_per_expert is None:
                return
            counts = module.last_tokens_per_expert.detach()
            self._counts[layer] = self._counts.get(layer, 0) + counts
            self._dropped[layer] = self._dropped.get(layer, 0) + module.last_dropped_slots.detach()

        return record

    def add_tokens(self, local_tokens: int) -> None:
        self._tokens += local_tokens * self.num_processes

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def metrics(self) -> dict:
        now = time.perf_counter()
        logs = load_statistics(
            {k: v.cpu() for k, v in self._counts.items()},
            {k: float(v) for k, v in self._dropped.items()},
            self.top_k,
        )
        if self._start is not None and self._tokens:
            tokens_per_second = self._tokens / max(now - self._start, 1e-9)
            logs["tokens_per_second"] = tokens_per_second
            if self.peak_flops:
                logs["mfu"] = tokens_per_second * self.flops_per_token / (self.peak_flops * self.num_processes)
        self._counts, self._dropped, self._tokens, self._start = {}, {}, 0, now
        return logs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# Freezing

# Exact parameter-name patterns per group. Routers are `mlp.gate.*` only: never an expert's `gate_up_proj`, a dense
# layer's `mlp.gate_proj`, nor the shared expert's gate (LLaMA-MoE's substring match on "gate" froze those too).
FREEZE_GROUPS = {
    "routers": re.compile(r"(^|\.)mlp\.gate\.[^.]+$"),
    "attention": re.compile(r"(^|\.)self_attn\."),
    "embeddings": re.compile(r"(^|\.)embed_tokens\."),
    "lm_head": re.compile(r"^lm_head\."),
    "norms": re.compile(r"(layernorm|(^|\.)norm)\.weight$"),
    "experts": re.compile(r"(^|\.)mlp\.(experts|shared_expert|shared_expert_gate)\.|(^|\.)mlp\.(gate|up|down)_proj\."),
}


def parse_freeze(spec: str | None) -> tuple[int, list[str]]:
    """`"routers_only:100,attention"` -> (100, ["attention"])."""
    routers_only, groups = 0, []
    for item in [part.strip() for part in (spec or "").split(",") if part.strip()]:
        if item.startswith("routers_only"):
            _, _, steps = item.partition(":")
            if not steps.isdigit() or int(steps) <= 0:
                raise ValueError(
                    f"--freeze {item!r}: write routers_only:N with N > 0 steps (example: routers_only:100)."
                )
            routers_only = int(steps)
        elif item in FREEZE_GROUPS:
            groups.append(item)
        else:
            raise ValueError(f"--freeze {item!r} is unknown; use routers_only:N and/or {sorted(FREEZE_GROUPS)}.")
    return routers_only, groups


def parameters_in_group(model, group: str) -> list[str]:
    return [name for name, _ in model.named_parameters(remove_duplicate=False) if FREEZE_GROUPS[group].search(name)]


class FreezeCallback(TrainerCallback):
    """Groups in `frozen` get requires_grad=False before training (outside the optimizer, no weight decay).
    `routers_only` > 0: for the first steps only router parameters change: the trainer calls `drop_grads()`
    after each backward, which clears every other gradient, so clipping, AdamW and weight decay skip them
    (a requires_grad switch mid-run would break DDP's gradient buckets)."""

    def __init__(self, model, routers_only: int = 0, frozen: list[str] = ()):
        self.model, self.routers_only, self.frozen = model, routers_only, list(frozen)
        self.frozen_names = set()
        for group in self.frozen:
            names = parameters_in_group(model, group)
            if not names:
                raise ValueError(f"--freeze {group}: the model has no {group} parameters to freeze.")
            self.frozen_names.update(names)
        self.router_names = set(parameters_in_group(model, "routers"))
        if routers_only and not self.router_names:
            raise ValueError(
                "--freeze routers_only:N needs an MoE model with routers (mlp.gate.*); this model has none."
            )
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in self.frozen_names:
                param.requires_grad_(False)
        self._others = [
            param for name, param in model.named_parameters() if name not in self.router_names and param.requires_grad
        ]
        self._announced = False

    def in_routers_only_phase(self, global_step: int) -> bool:
        return global_step < self.routers_only

    def drop_grads(self, global_step: int) -> None:
        if self.in_routers_only_phase(global_step):
            for param in self._others:
                param.grad = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.routers_only and state.global_step == self.routers_only and not self._announced:
            self._announced = True
            print(f"[llama-moe train] step {state.global_step}: routers-only phase over, training all parameters.")


# ---------------------------------------------------------------------------------------------------------------
# Mixture


class MixtureCallback(TrainerCallback):
    """Reads each domain's held-out loss at every evaluation and, with dynamic sampling, updates the mixture
    weights once all domains are measured. The weights go into the logs at every logging step."""

    def __init__(self, dataset, sampling: str, references: dict | None, eta: float, smoothing: float):
        self.dataset, self.sampling, self.eta, self.smoothing = dataset, sampling, eta, smoothing
        self.references = dict(references or {})
        self._losses, self.updates = {}, 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        for key, value in (metrics or {}).items():
            for name in self.dataset.names:
                if key == f"eval_{name}_loss":
                    self._losses[name] = float(value)
        if len(self._losses) < len(self.dataset.names):
            return
        losses, self._losses = self._losses, {}
        if self.sampling != "dynamic":
            return
        if not self.references:  # no reference given or measured: the first evaluation is the reference
            self.references = dict(losses)
            return
        self.dataset.weights = dynamic_update(self.dataset.weights, losses, self.references, self.eta, self.smoothing)
        self.updates += 1
        if state.is_world_process_zero:
            shown = ", ".join(f"{n}={w:.3f}" for n, w in self.dataset.weights.items())
            print(f"[llama-moe train] step {state.global_step}: mixture weights -> {shown}")

    def metrics(self) -> dict:
        return {f"mixture/weight/{name}": round(w, 5) for name, w in self.dataset.weights.items()}

    def state_at(self, consumed: int) -> dict:
        return {**self.dataset.state_at(consumed), "references": self.references, "updates": self.updates}

    def load_state(self, state: dict) -> None:
        self.dataset.load_state(state)
        self.references = dict(state.get("references") or self.references)
        self.updates = int(state.get("updates", 0))


# ---------------------------------------------------------------------------------------------------------------
# Console


# Per-layer expert loads: 30 layers x 8 experts would bury the loss on the console. They stay in the Trainer's log
# history and in every `--report_to`.
CONSOLE_HIDDEN = re.compile(r"^moe/layer_\d+/")


def console_logs(logs: dict | None) -> dict:
    return {key: value for key, value in (logs or {}).items() if not CONSOLE_HIDDEN.match(key)}


class MoEProgressCallback(ProgressCallback):
    """The usual progress bar and log lines, without the per-layer expert loads."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=console_logs(logs), **kwargs)


class MoEPrinterCallback(PrinterCallback):
    """The plain log printer (`--disable_tqdm true`), without the per-layer expert loads."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=console_logs(logs), **kwargs)
