"""`llama-moe analyze` behind the CLI: per-domain perplexity, routing statistics, parameter counts and speed.

Runs the model (and optionally its dense base) and writes every number to one `analysis.json`; plots and
the report are made from that file alone (plots.py, report.py), never from live models.
"""

import gc
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

from transformers import AutoConfig

from llama_moe.conversion.atomic import atomic_write_text

from .loading import load_model_and_tokenizer
from .perplexity import domain_perplexity, read_domain_texts, token_blocks
from .routing import RoutingStats, routing_settings
from .speed import generation_speed, parameter_counts
from .unseen_domain import CLOZE_TASK, UNSEEN_DOMAIN, write_unseen_domain

ANALYSIS_FILE = "analysis.json"


def parse_data_args(items: list[str], allow_none: bool = False) -> dict[str, Path]:
    """["code=src/", "prose=book.txt"] -> {"code": Path, ...}, checking names and paths before any work."""
    domains: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(
                f'--data {item!r}: write NAME=PATH (a text file, a .jsonl with a "text" field, or a folder).'
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"--data name {name!r}: use letters, digits, '_', '-' or '.' (it names output files).")
        if name in domains:
            raise ValueError(f"--data name {name!r} is given twice.")
        if not Path(path).exists():
            raise FileNotFoundError(f"--data {name}={path}: no such file or folder.")
        domains[name] = Path(path)
    if not domains and not allow_none:
        raise ValueError("Give at least one --data NAME=PATH.")
    return domains


def _block_size(model, requested: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    return min(requested or 512, limit)


def _is_moe(model) -> bool:
    config = model.config
    return bool(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)) and bool(
        getattr(config, "num_experts_per_tok", None)
    )


def analyze_one(
    model,
    tokenizer,
    domains: dict[str, Path],
    max_tokens: int,
    block_size: int | None,
    speed: bool,
    new_tokens: int,
    prompt_tokens: int,
    label: str,
) -> dict:
    """Perplexity (and, for an MoE model, routing statistics) per domain; parameter counts; speed."""
    result = {"parameters": parameter_counts(model), "domains": {}}
    size = _block_size(model, block_size)
    moe = _is_moe(model)
    first_blocks = None
    for name, path in domains.items():
        blocks = token_blocks(tokenizer, read_domain_texts(path), size, max_tokens)
        if not blocks:
            raise ValueError(f"--data {name}={path} gives fewer than 2 tokens.")
        first_blocks = first_blocks or blocks
        stats = RoutingStats(*routing_settings(model.config)) if moe else None
        scores = domain_perplexity(
            model,
            blocks,
            on_outputs=(lambda out: stats.update(out.router_logits)) if moe else None,
            forward_kwargs={"output_router_logits": True} if moe else None,
            progress=f"{label}: {name}",
        )
        if stats is not None:
            scores["routing"] = stats.summary()
        scores["block_size"] = size
        result["domains"][name] = scores
    if speed:
        prompt = [token for block in first_blocks for token in block][:prompt_tokens]
        result["speed"] = generation_speed(model, prompt, new_tokens=new_tokens)
    return result


def _config_summary(config) -> dict:
    keys = (
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_layers",
        "norm_topk_prob",
        "router_type",
        "shared_expert_intermediate_size",
        "capacity_factor",
        "vocab_size",
    )
    return {key: getattr(config, key) for key in keys if getattr(config, key, None) is not None}


def cloze_accuracy(model, tokenizer, items: int) -> dict:
    """Accuracy on the unseen domain's cloze task (lm-evaluation-harness), on its first `items` items."""
    from .lm_eval_runner import evaluate, parse_task_specs

    run = evaluate(model, parse_task_specs([CLOZE_TASK], None, None), tokenizer=tokenizer, limit=items, batch_size=8)
    scores = run.scores[CLOZE_TASK]
    return {
        "task": CLOZE_TASK,
        "acc": scores["acc"],
        "acc_stderr": scores.get("acc_stderr"),
        "items": int(scores.get("sample_len", items)),
    }


def run_analysis(
    model_path: str,
    domains: dict[str, Path],
    output: Path,
    base_path: str | None = None,
    max_tokens: int = 4096,
    block_size: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    speed: bool = True,
    new_tokens: int = 32,
    prompt_tokens: int = 128,
    unseen: bool = True,
    cloze_items: int = 0,
) -> Path:
    """Analyze MODEL (and BASE) on the domains, plus the unseen domain (prose no calibration or training of ours
    reads) unless `unseen` is False, and its cloze task on `cloze_items` items; write OUTPUT/analysis.json."""
    if max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {max_tokens}.")
    if cloze_items < 0:
        raise ValueError(f"--cloze-items must be >= 0, got {cloze_items}.")
    if unseen:
        if UNSEEN_DOMAIN in domains:
            raise ValueError(f"--data name {UNSEEN_DOMAIN!r} is the unseen domain's; name your domain otherwise.")
        domains = {**domains, UNSEEN_DOMAIN: write_unseen_domain(output / UNSEEN_DOMAIN)}
    if not domains:
        raise ValueError("no domain to analyze: give --data NAME=PATH or keep the unseen domain.")
    options = dict(
        max_tokens=max_tokens, block_size=block_size, speed=speed, new_tokens=new_tokens, prompt_tokens=prompt_tokens
    )
    for path in filter(None, (model_path, base_path)):  # fail on a wrong path before loading anything
        if (os.path.isabs(path) or path.startswith(".") or path.endswith(".gguf")) and not os.path.exists(path):
            raise FileNotFoundError(f"Model {path} not found.")
    if not str(model_path).endswith(".gguf"):
        if not _is_moe(SimpleNamespace(config=AutoConfig.from_pretrained(model_path, trust_remote_code=True))):
            raise ValueError(
                f"{model_path} is not an MoE model (no num_local_experts/num_experts_per_tok in its "
                "config): analyze the MoE model and pass the dense one as --base."
            )
    started = time.time()
    model, tokenizer = load_model_and_tokenizer(model_path, device=device, dtype=dtype)
    payload = {
        "model": str(model_path),
        "base": str(base_path) if base_path else None,
        "config": _config_summary(model.config),
        "settings": {**options, "device": device, "dtype": dtype},
        "data": {name: str(path) for name, path in domains.items()},
        "unseen_domains": [UNSEEN_DOMAIN] if unseen else [],
    }
    payload["results"] = {"model": analyze_one(model, tokenizer, domains, label="model", **options)}
    if cloze_items:
        payload["results"]["model"]["cloze"] = cloze_accuracy(model, tokenizer, cloze_items)
    del model
    gc.collect()
    if base_path:
        base, base_tokenizer = load_model_and_tokenizer(base_path, device=device, dtype=dtype)
        payload["results"]["base"] = analyze_one(base, base_tokenizer, domains, label="base", **options)
        if cloze_items:
            payload["results"]["base"]["cloze"] = cloze_accuracy(base, base_tokenizer, cloze_items)
        del base
        gc.collect()
    payload["seconds"] = time.time() - started
    output.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(output / ANALYSIS_FILE, json.dumps(payload, indent=2))
