"""Benchmarks a model with lm-evaluation-harness (`lm_eval.simple_evaluate`): presets, local tasks, base-vs-MoE tables.

Only wraps the harness (task loading, few-shot settings, result tables and files); it never re-implements a
metric, and it fails with a clear message before loading any model when a task's data cannot be reached.
"""

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import constants

from llama_moe.conversion.atomic import atomic_write_text
from llama_moe.conversion.model_path import locate_model

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASK_TAG = "llama_moe_local"

# The seeds' benchmark sets as (lm-eval task, few-shot). LLaMA-MoE (Zhu et al., 2024) reports these ten.
PRESETS: dict[str, list[tuple[str, int]]] = {
    "llama-moe-v1": [
        ("sciq", 0),
        ("piqa", 0),
        ("winogrande", 0),
        ("arc_easy", 0),
        ("arc_challenge", 25),
        ("hellaswag", 10),
        ("logiqa", 0),
        ("boolq", 32),
        ("lambada_openai", 0),
        ("mmlu", 5),
    ],
    # "Llama 3 Meets MoE: Efficient Upcycling" (Vavre et al., 2024): MMLU 0/5-shot and zero-shot commonsense;
    # TruthfulQA as lm-eval's multiple-choice truthfulqa_mc2 (the generative variant needs extra judge models).
    "llama3-meets-moe": [
        ("mmlu", 0),
        ("mmlu", 5),
        ("truthfulqa_mc2", 0),
        ("piqa", 0),
        ("sciq", 0),
        ("logiqa", 0),
        ("boolq", 0),
        ("openbookqa", 0),
    ],
}


def local_tasks_dir() -> Path:
    """The folder of the local tasks shipped with llama-moe, usable as lm-eval's `--include_path` from any
    working directory (each YAML resolves its JSONL next to itself)."""
    return LOCAL_TASKS_DIR


@dataclass(frozen=True)
class TaskSpec:
    name: str
    num_fewshot: int | None = None  # None: the task's own default


def parse_task_specs(tasks: list[str] | None, preset: str | None, num_fewshot: int | None) -> list[TaskSpec]:
    """`--tasks a,b:5 c` and/or `--preset NAME` -> task specs. `name:N` fixes that task's few-shot count;
    `--num-fewshot` applies to the others."""
    specs: list[TaskSpec] = []
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
        specs += [TaskSpec(name, shots) for name, shots in PRESETS[preset]]
    for item in tasks or []:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, _, shots = part.partition(":")
            if shots and not shots.isdigit():
                raise ValueError(f"Task {part!r}: the few-shot count after ':' must be a number, e.g. {name}:5.")
            specs.append(TaskSpec(name, int(shots) if shots else num_fewshot))
    if not specs:
        raise ValueError(
            f"No tasks given: pass --tasks (e.g. --tasks {LOCAL_TASK_TAG}) or --preset ({', '.join(PRESETS)})."
        )
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}.")
    return list(dict.fromkeys(specs))


def _offline() -> bool:
    datasets_offline = os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or datasets_offline


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def build_task_manager(specs: list[TaskSpec], include_path: list[str] | None = None):
    """A TaskManager that knows the local tasks, the user's include paths and, only when needed, lm-eval's
    built-in tasks (indexing those takes ~10 s, so managers are cached per process)."""
    paths = (str(LOCAL_TASKS_DIR),) + tuple(str(p) for p in include_path or [])
    for path in paths[1:]:
        if not Path(path).exists():
            raise FileNotFoundError(f"--include-path {path} does not exist: give a folder of lm-eval task YAMLs.")
    manager = _task_manager(paths, include_defaults=False)
    if all(spec.name in manager.all_tasks for spec in specs):
        return manager
    manager = _task_manager(paths, include_defaults=True)
    unknown = [spec.name for spec in specs if spec.name not in manager.all_tasks and not Path(spec.name).is_file()]
    if unknown:
        raise ValueError(
            f"Unknown lm-eval task(s) {unknown}. Local tasks: {local_task_names()}; list all with `lm_eval ls tasks`; "
            "add your own YAMLs with --include-path DIR."
        )
    return manager


def local_task_names() -> list[str]:
    return [LOCAL_TASK_TAG] + sorted(p.stem for p in LOCAL_TASKS_DIR.glob("*.yaml"))


NETWORK_ERROR_NAMES = (
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "Timeout",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "DatasetNotFoundError",
    "HfHubHTTPError",
)


def _is_network_error(error: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) comes from not reaching the Hub: datasets, requests
    and httpx each raise their own classes, so match by class name along the chain."""
    seen = 0
    while error is not None and seen < 10:
        if any(cls.__name__ in NETWORK_ERROR_NAMES for cls in type(error).__mro__):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def check_tasks_reachable(manager, specs: list[TaskSpec]) -> None:
    """Load every task's data once, before any model is loaded, so missing data fails fast and clearly."""
    try:
        manager.load(sorted({spec.name for spec in specs}))
    except FileNotFoundError:
        raise
    except Exception as error:
        if not _is_network_error(error):
            raise
        hint = (
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, so nothing can be downloaded"
            if _offline()
            else "the Hugging Face Hub could not be reached"
        )
        raise ValueError(
            f"These tasks need datasets from the Hugging Face Hub, but {hint} ({error}). Connect to the network "
            f"(or pre-download the datasets into the HF cache), or evaluate the local tasks: --tasks {LOCAL_TASK_TAG}."
        ) from error


@dataclass
class EvalRun:
    """Results of one model on a list of task specs: {label: {metric: value}} plus lm-eval's raw output."""

    model: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    n_shot: dict[str, int] = field(default_factory=dict)
    raw: list[dict] = field(default_factory=list)
    samples: dict[str, list] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "n_shot": self.n_shot,
            "scores": self.scores,
            "higher_is_better": self.higher_is_better,
        }


def _clean_metrics(task_results: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": x, "acc_stderr,none": y, "alias": ...} -> {"acc": x, "acc_stderr": y}."""
    metrics = {}
    for key, value in task_results.items():
        if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filter_name = key.partition(",")
        metrics[metric if filter_name in ("", "none") else f"{metric},{filter_name}"] = float(value)
    return metrics


def load_lm(
    model,
    tokenizer=None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int | str = 1,
    trust_remote_code: bool = True,
):
    """An lm-eval HFLM for a path / Hub id (loaded with trust_remote_code) or an already loaded model."""
    from lm_eval.models.huggingface import HFLM

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, (str, os.PathLike)):
        # A dense base as GGUF is dequantized by transformers (gguf_file=).
        model, options = locate_model(model).from_pretrained_arguments()
        return HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            **options,
        )
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, trust_remote_code=trust_remote_code)


def evaluate(
    model,
    specs: list[TaskSpec],
    *,
    tokenizer=None,
    include_path: list[str] | None = None,
    limit: int | float | None = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int | str = 1,
    log_samples: bool = False,
    seed: int = 1234,
    task_manager=None,
) -> EvalRun:
    """Run lm-eval on one model. Tasks with different few-shot counts run as separate simple_evaluate calls
    sharing one loaded model; the same task may appear with several counts (MMLU 0- and 5-shot)."""
    from lm_eval import simple_evaluate

    manager = task_manager or build_task_manager(specs, include_path)
    if task_manager is None:
        check_tasks_reachable(manager, specs)
    lm = load_lm(model, tokenizer=tokenizer, device=device, dtype=dtype, batch_size=batch_size)
    name = model if isinstance(model, (str, os.PathLike)) else getattr(model.config, "_name_or_path", "model")
    run = EvalRun(model=str(name))
    by_shots: dict[int | None, list[str]] = {}
    for spec in specs:
        by_shots.setdefault(spec.num_fewshot, []).append(spec.name)
    for shots, names in by_shots.items():
        results = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=shots,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        run.raw.append(
            {key: results[key] for key in ("results", "groups", "n-shot", "versions", "config") if key in results}
        )
        for task, task_results in results["results"].items():
            label = task if shots is None else f"{task} ({shots}-shot)"
            run.scores[label] = _clean_metrics(task_results)
            run.higher_is_better[label] = results.get("higher_is_better", {}).get(task, {})
            run.n_shot[label] = int(results.get("n-shot", {}).get(task, shots or 0))
        if log_samples:
            for task, samples in results.get("samples", {}).items():
                run.samples[task if shots is None else f"{task} ({shots}-shot)"] = samples
    return run


def comparison_rows(base: EvalRun, moe: EvalRun) -> list[dict]:
    """One row per (task, metric) present in both runs: base, MoE and delta (MoE - base); stderr left out."""
    rows = []
    for label, moe_metrics in moe.scores.items():
        base_metrics = base.scores.get(label, {})
        for metric, value in moe_metrics.items():
            if "_stderr" in metric or metric == "sample_len" or metric not in base_metrics:
                continue
            rows.append(
                {
                    "task": label,
                    "metric": metric,
                    "base": base_metrics[metric],
                    "moe": value,
                    "delta": value - base_metrics[metric],
                    "higher_is_better": moe.higher_is_better.get(label, {}).get(metric.split(",")[0]),
                }
            )
    return rows


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def scores_table(run: EvalRun) -> str:
    lines = ["| task | n-shot | examples | metric | value | ± stderr |", "|---|---:|---:|---|---:|---:|"]
    for label, metrics in run.scores.items():
        examples = int(metrics.get("sample_len", 0))
        for metric, value in metrics.items():
            if "_stderr" in metric or metric == "sample_len":
                continue
            base_name, _, filter_name = metric.partition(",")
            stderr = metrics.get(f"{base_name}_stderr" + (f",{filter_name}" if filter_name else ""))
            lines.append(
                f"| {label} | {run.n_shot.get(label, 0)} | {examples} | {metric} | {_fmt(value)} | {_fmt(stderr)} |"
            )
    return "\n".join(lines)


def comparison_table(rows: list[dict]) -> str:
    lines = ["| task | metric | base | MoE | delta |", "|---|---|---:|---:|---:|"]
    for row in rows:
        arrow = {True: " ↑", False: " ↓"}.get(row["higher_is_better"], "")
        lines.append(
            f"| {row['task']} | {row['metric']}{arrow} | {_fmt(row['base'])} | {_fmt(row['moe'])} | "
            f"{row['delta']:+.4f} |"
        )
    return "\n".join(lines)


def write_results(output: Path, run: EvalRun, base: EvalRun | None = None) -> dict[str, Path]:
    """Writes results.json (every number, lm-eval's raw results included) and results.md (the table)."""
    from lm_eval.utils import handle_non_serializable

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    payload = {"model": run.to_json(), "lm_eval_raw": run.raw}
    markdown = f"# lm-eval results: {run.model}\n\n{scores_table(run)}\n"
    if base is not None:
        rows = comparison_rows(base, run)
        payload.update(base=base.to_json(), base_raw=base.raw, comparison=rows)
        markdown += f"\n## MoE vs dense base ({base.model})\n\n{comparison_table(rows)}\n"
    paths = {"json": output / "results.json", "markdown": output / "results.md"}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=handle_non_serializable))
    atomic_write_text(paths["markdown"], markdown)
    return paths
