"""The quickstart's report: base vs upcycled vs trained in one markdown page with its figures.

Writes `quickstart.json` (every number) and then draws only from it and from the trainer's own log
(`trainer_state.json`); it never loads a model.
"""

import json
import math
from pathlib import Path

import numpy as np

from llama_moe.conversion.atomic import atomic_write_text

from .plots import _pyplot, _save, load_heatmap, trade_off_figure

LABELS = {"base": "dense base", "upcycled": "upcycled (before training)", "trained": "upcycled + trained"}
COLOURS = {"base": "tab:blue", "upcycled": "tab:gray", "trained": "tab:orange"}


def training_log(train_dir: Path) -> list[dict]:
    """The log history of the latest checkpoint under `train_dir` (the Trainer keeps it there)."""
    states = sorted(
        Path(train_dir).glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    return json.loads(states[-1].read_text())["log_history"] if states else []


def perplexity_figure(results: dict, path: Path) -> Path:
    plt = _pyplot()
    labels = list(results)
    domains = list(results[labels[0]]["domains"])
    x = np.arange(len(domains))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 1.8 * len(domains)), 4))
    for i, label in enumerate(labels):
        values = [results[label]["domains"][d]["perplexity"] for d in domains]
        bars = ax.bar(
            x + (i - (len(labels) - 1) / 2) * width,
            values,
            width,
            label=LABELS.get(label, label),
            color=COLOURS.get(label),
        )
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(x, domains)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax.set_title("Perplexity per domain")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(labels), fontsize=8, frameon=False)
    return _save(fig, path)


def training_figure(log: list[dict], path: Path) -> Path | None:
    train = [e for e in log if "loss" in e and "step" in e]
    if not train:
        return None
    plt = _pyplot()
    fig, (loss_ax, weight_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [e["step"] for e in train]
    loss_ax.plot(steps, [e["loss"] for e in train], label="training loss (LM + balance)", color="black", linewidth=1)
    for key in sorted({k for e in log for k in e if k.startswith("eval_") and k.endswith("_loss")}):
        points = [(e["step"], e[key]) for e in log if key in e]
        loss_ax.plot(*zip(*points), marker="o", label=f"held-out {key[5:-5]} loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=8)
    loss_ax.set_title("Loss")
    weight_keys = sorted({k for e in train for k in e if k.startswith("mixture/weight/")})
    for key in weight_keys:
        weight_ax.plot(steps, [e.get(key) for e in train], label=key.split("/")[-1])
    weight_ax.set_xlabel("step")
    weight_ax.set_ylabel("sampling weight")
    weight_ax.set_ylim(0, 1)
    weight_ax.legend(fontsize=8)
    weight_ax.set_title("Dynamic mixture weights")
    fig.tight_layout()
    return _save(fig, path)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _perplexity_cell(value: float, base: float, is_base: bool) -> str:
    return f"{value:.2f}" if is_base else f"{value:.2f} ({value / base:.2f}x)"


def _accuracy(scores: dict) -> str:
    for task, metrics in scores.items():
        if "acc" in metrics:
            stderr = metrics.get("acc_stderr")
            return f"{metrics['acc']:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
    return "n/a"


CLOSE_TO_DENSE = 1.5  # perplexity ratio the quickstart aims for
MULTIPLE_CHOICE_OPTIONS = 4  # the unseen-prose cloze task: 4 words


def is_degenerate(text: str) -> bool:
    """A generation that says nothing: empty, whitespace, or at most two distinct characters repeated."""
    visible = "".join(text.split())
    return len(set(visible)) <= 2


def collapsed_layers(routing: dict) -> list[int]:
    """MoE layers whose load is spread over fewer than top_k + 1 experts (effective number exp(entropy))."""
    return [
        int(layer)
        for layer, stats in routing["per_layer"].items()
        if math.exp(stats["load_entropy"]) < routing["top_k"] + 1
    ]


def findings(results: dict) -> list[str]:
    """What a reader should know first, in words: how far each model is from the dense one, and whether its
    generations, benchmark score or routing are broken."""
    base = results["base"]
    domains = list(base["domains"])
    lines = []
    for label in ("upcycled", "trained"):
        result = results[label]
        ratios = [result["domains"][d]["perplexity"] / base["domains"][d]["perplexity"] for d in domains]
        worst = max(ratios)
        where = ", ".join(f"{r:.2f}x on {d}" for r, d in zip(ratios, domains))
        if worst <= CLOSE_TO_DENSE:
            verdict = f"close to the dense model (within {CLOSE_TO_DENSE}x)"
        elif worst <= 10:
            verdict = "not yet at dense quality"
        else:
            verdict = "far from dense quality: it needs (much) more training"
        lines.append(f"**{LABELS[label]}**: held-out perplexity {where} the dense model's: {verdict}.")
        bad = [prompt for prompt, text in result["generations"].items() if is_degenerate(text)]
        if bad:
            lines.append(
                f"**{LABELS[label]}**: {len(bad)} of {len(result['generations'])} greedy generations are "
                "degenerate (empty or one or two characters repeated): the model does not produce text yet."
            )
        for task, metrics in result["lm_eval"].items():
            acc, stderr = metrics.get("acc"), metrics.get("acc_stderr") or 0.0
            chance = 1 / MULTIPLE_CHOICE_OPTIONS
            if acc is not None and acc - chance <= 2 * stderr:
                lines.append(
                    f"**{LABELS[label]}**: the lm-eval score ({acc:.3f}) cannot be told from chance "
                    f"({chance:.2f}) at this sample size."
                )
        for domain in domains:
            routing = result["domains"][domain].get("routing")
            layers = collapsed_layers(routing) if routing else []
            if layers:
                lines.append(
                    f"**{LABELS[label]}**: routing on {domain} collapsed in {len(layers)} of "
                    f"{len(routing['per_layer'])} MoE layers (load spread over fewer than top-k + 1 "
                    f"experts: layers {layers[:8]}{' ...' if len(layers) > 8 else ''})."
                )
    return lines


def write_quickstart_report(summary: dict, out: Path) -> Path:
    out = Path(out)
    atomic_write_text(out / "quickstart.json", json.dumps(summary, indent=2))
    figures = out / "figures"
    results = summary["results"]
    domains = list(results["base"]["domains"])
    perplexity_png = perplexity_figure(results, figures / "perplexity.png")
    log = training_log(Path(summary["training_log"]))
    training_png = training_figure(log, figures / "training.png")
    routings = {
        (label, domain): results[label]["domains"][domain].get("routing")
        for label in ("upcycled", "trained")
        for domain in domains
    }
    routings = {key: routing for key, routing in routings.items() if routing}
    # One colour scale for every heatmap, so before and after training can be compared cell by cell.
    ceiling = max(
        (max(stats["load_share"]) for r in routings.values() for stats in r["per_layer"].values()), default=None
    )
    heatmaps = {
        (label, domain): load_heatmap(
            f"{domain}, {LABELS[label]}", routing, figures / f"expert_load_{label}_{domain}.png", ceiling=ceiling
        )
        for (label, domain), routing in routings.items()
    }

    lines = [
        f"# llama-moe quickstart: {Path(summary['base']).name} upcycled to {summary['num_experts']} experts, "
        f"top-{summary['top_k']} ({summary['method']})",
        "",
    ]
    verify = summary["verify"]
    params = summary["parameters"]
    lines += [
        f"Base model `{summary['base']}`; {params['total'] / 1e6:.1f}M parameters after upcycling, "
        f"{params['active'] / 1e6:.1f}M active per token. Trained {summary['steps']} steps on the embedded corpus "
        f"with dynamic mixture sampling. Total time {summary['timings']['total'] / 60:.1f} min on "
        f"{summary['machine']['cpus']} CPU(s).",
        "",
        f"Right after upcycling: {verify['summary']}.",
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in findings(results)],
        "",
        "## Held-out perplexity",
        "",
    ]
    unseen = summary.get("unseen_domains", [])
    base_ppl = results["base"]["domains"]
    rows = [
        [LABELS[label]]
        + [
            _perplexity_cell(results[label]["domains"][d]["perplexity"], base_ppl[d]["perplexity"], label == "base")
            for d in domains
        ]
        for label in results
    ]
    header = ["model"] + [f"{d} (unseen)" if d in unseen else d for d in domains]
    lines += _table(header, rows) + [""]
    if unseen:
        lines += [
            f"{', '.join(unseen)}: English prose (Botchan, Project Gutenberg #8868) that neither calibration nor "
            "training read: how the model does on text it was not built for.",
            "",
        ]
    lines += [f"![perplexity](figures/{perplexity_png.name})", ""]
    lines += ["## lm-eval: cloze task on the unseen prose (which of four words ends the sentence; chance 0.25)", ""]
    lines += _table(["model", "accuracy"], [[LABELS[label], _accuracy(results[label]["lm_eval"])] for label in results])
    lines += [""]
    if training_png is not None:
        final = next((e for e in reversed(log) if "loss" in e), {})
        lines += [
            "## Training",
            "",
            f"![training](figures/{training_png.name})",
            "",
            f"Last logged step: loss {final.get('loss', float('nan')):.3f}, balance loss "
            f"{final.get('aux_loss', float('nan')):.3f}, mean expert-load CV "
            f"{final.get('moe/load_cv_mean', float('nan')):.3f}. "
            "Full log: `train/checkpoint-*/trainer_state.json`.",
            "",
        ]
    lines += [
        "## Routing",
        "",
        "Share of routed token slots per expert (rows) and MoE layer (columns); red = busier than uniform.",
        "",
    ]
    for (label, domain), png in heatmaps.items():
        lines += [f"**{LABELS[label]}, {domain}**", "", f"![{label} {domain}](figures/{png.name})", ""]
    rows = []
    for label in ("upcycled", "trained"):
        for domain in domains:
            routing = results[label]["domains"][domain].get("routing")
            if routing:
                per_layer = routing["per_layer"].values()
                cv = sum(layer["load_cv"] for layer in per_layer) / len(per_layer)
                entropy = sum(layer["load_entropy_normalized"] for layer in per_layer) / len(per_layer)
                rows.append([LABELS[label], domain, f"{cv:.3f}", f"{entropy:.3f}"])
    lines += _table(["model", "domain", "mean load CV", "mean normalized entropy"], rows) + [""]
    speeds = {
        LABELS[label]: (r["speed"]["decode_tokens_per_s"], {d: r["domains"][d]["perplexity"] for d in domains})
        for label, r in results.items()
    }
    trade_off_png = trade_off_figure(speeds, figures / "trade_off.png", unseen=unseen)
    lines += ["## Speed (batch 1, greedy, this machine)", ""]
    rows = [
        [
            LABELS[label],
            f"{r['parameters']['active'] / 1e6:.1f}M / {r['parameters']['total'] / 1e6:.1f}M",
            f"{r['speed']['prefill_tokens_per_s']:.0f}",
            f"{r['speed']['decode_tokens_per_s']:.1f}",
        ]
        for label, r in results.items()
    ]
    lines += _table(["model", "active / total params", "prefill tok/s", "decode tok/s"], rows) + [""]
    lines += [
        "Quality against speed: to the right of the dense model is faster, below it is better.",
        "",
        f"![trade-off](figures/{trade_off_png.name})",
        "",
    ]
    lines += ["## Generations (greedy)", ""]
    for prompt in results["base"]["generations"]:
        lines += [f"Prompt: `{prompt!r}`", ""]
        lines += _table(
            ["model", "continuation"],
            [
                [LABELS[label], "`" + repr(r["generations"][prompt])[1:-1].replace("|", "\\|") + "`"]
                for label, r in results.items()
            ],
        )
        lines += [""]
    lines += [
        "## Reproduce or continue",
        "",
        "```bash",
        summary["train_command"],
        "```",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items()),
        "",
    ]
    return atomic_write_text(out / "report.md", "\n".join(lines))
