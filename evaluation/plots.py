"""Figures from `analysis.json`: per domain an experts-by-layers load heatmap and expert co-activation matrices, and
a perplexity bar chart; and the quality-against-speed trade-off of several models (quickstart, quality benchmark).

Reads only the JSON the analysis wrote (never a model) and renders with matplotlib's Agg backend, so it
runs headless; each figure is written atomically as PNG.
"""

import io
import json
from pathlib import Path

import numpy as np

from llama_moe.conversion.atomic import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def load_heatmap(domain: str, routing: dict, path: Path, ceiling: float | None = None) -> Path:
    """Experts (rows) x MoE layers (columns), colour = share of routed slots; centred on the uniform share
    1/E so over-used experts are red and under-used ones blue, as in LLaMA-MoE's specialization figures.
    `ceiling`: the share drawn darkest red (give several heatmaps one ceiling to compare them)."""
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
    layers = routing["layers"]
    num_experts = routing["num_experts"]
    share_EL = np.array([routing["per_layer"][str(layer)]["load_share"] for layer in layers]).T
    uniform = 1.0 / num_experts
    # Fixed floor 0 and a ceiling of at least 2/E, so near-balanced routing looks pale rather than dramatic.
    norm = TwoSlopeNorm(vcenter=uniform, vmin=0.0, vmax=max(ceiling or float(share_EL.max()), 2 * uniform))
    width = min(2.0 + 0.55 * len(layers), 22)
    height = min(1.6 + 0.42 * num_experts, 16)
    fig, ax = plt.subplots(figsize=(max(width, 5.5), max(height, 3.2)))
    image = ax.imshow(share_EL, cmap="coolwarm", norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    step = 1 if num_experts <= 32 else num_experts // 16  # keep expert labels legible for 64+ experts
    ax.set_yticks(range(0, num_experts, step), [str(e) for e in range(0, num_experts, step)])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("expert")
    ax.set_title(
        f"Expert load share per layer: {domain}\n"
        f"({routing['tokens']} tokens, top-{routing['top_k']} of {num_experts}; uniform = {uniform:.3f})"
    )
    if share_EL.size <= 256:
        for e in range(num_experts):
            for col in range(len(layers)):
                value = share_EL[e, col]
                strong = abs(norm(value) - 0.5) > 0.3
                ax.text(
                    col, e, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white" if strong else "black"
                )
    bar = fig.colorbar(image, ax=ax)
    # The norm is two linear halves around 1/E: tick both halves evenly and name the centre.
    ticks = sorted(set(np.linspace(norm.vmin, uniform, 3).tolist() + np.linspace(uniform, norm.vmax, 4).tolist()))
    bar.set_ticks(ticks, labels=[f"{t:.3f}" + (" (uniform)" if t == uniform else "") for t in ticks])
    bar.set_label("share of routed token slots")
    return _save(fig, path)


def coactivation_layers(layers: list[int], count: int = 4) -> list[int]:
    """Up to `count` MoE layers spread from the first to the last."""
    if len(layers) <= count:
        return list(layers)
    return [layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)]


def coactivation_heatmaps(domain: str, routing: dict, path: Path) -> Path:
    """For a few layers, P(expert j chosen | expert i chosen) for i != j (OLMoE's co-activation), from the
    co-selection counts: which experts tend to fire together beyond what the top-k of uniform routing gives."""
    plt = _pyplot()
    num_experts, top_k = routing["num_experts"], routing["top_k"]
    shown = coactivation_layers(routing["layers"])
    size = min(max(2.6, 0.22 * num_experts), 5.0)
    fig, axes = plt.subplots(1, len(shown), figsize=(size * len(shown) + 1.2, size + 0.8), squeeze=False)
    chance = (top_k - 1) / (num_experts - 1) if num_experts > 1 else 0.0  # uniform, independent routing
    image = None
    for ax, layer in zip(axes[0], shown):
        both_EE = np.array(routing["per_layer"][str(layer)]["coselection"], dtype=float)
        chosen_E = np.diag(both_EE).copy()
        given_EE = np.divide(both_EE, chosen_E[:, None], out=np.zeros_like(both_EE), where=chosen_E[:, None] > 0)
        np.fill_diagonal(given_EE, np.nan)
        image = ax.imshow(given_EE, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("expert j", fontsize=8)
        if ax is axes[0][0]:
            ax.set_ylabel("expert i", fontsize=8)
        step = 1 if num_experts <= 16 else num_experts // 8
        ax.set_xticks(range(0, num_experts, step), [str(e) for e in range(0, num_experts, step)], fontsize=7)
        ax.set_yticks(range(0, num_experts, step), [str(e) for e in range(0, num_experts, step)], fontsize=7)
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85)
    bar.set_label("P(j chosen | i chosen)")
    bar.ax.axhline(chance, color="white", linewidth=1.5)
    fig.suptitle(
        f"Expert co-activation: {domain} (top-{top_k} of {num_experts}; "
        f"white line = {chance:.2f}, uniform independent routing)",
        fontsize=10,
    )
    return _save(fig, path)


def perplexity_bars(analysis: dict, path: Path) -> Path:
    """Perplexity per domain, the MoE model beside its base when one was analyzed (lower is better)."""
    plt = _pyplot()
    results = analysis["results"]
    domains = list(results["model"]["domains"])
    series = [("MoE model", results["model"], "tab:orange")]
    if "base" in results:
        series.insert(0, ("dense base", results["base"], "tab:blue"))
    x = np.arange(len(domains))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 + 1.4 * len(domains)), 4))
    for i, (label, result, colour) in enumerate(series):
        values = [result["domains"][d]["perplexity"] for d in domains]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label, color=colour)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(x, domains)
    ax.set_ylabel("perplexity (lower is better)")
    values = [r["domains"][d]["perplexity"] for _, r, _ in series for d in domains]
    log_scale = max(values) / max(min(values), 1e-9) > 50
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylim(top=max(values) * (4 if log_scale else 1.15))  # room for the value labels
    ax.set_title("Perplexity per domain" + (" (log scale)" if log_scale else ""))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(series), fontsize=8, frameon=False)
    return _save(fig, path)


def trade_off_figure(points: dict[str, tuple[float, dict[str, float]]], path: Path, unseen=()) -> Path:
    """Held-out perplexity against decode tokens per second: one panel per domain, one point per model.
    `points`: label -> (decode tokens/s, {domain: perplexity}). Where an MoE is worth it, it sits to the right of
    the dense model (faster) and not far above it (as good)."""
    plt = _pyplot()
    domains = list(next(iter(points.values()))[1])
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.8), squeeze=False)
    markers = "osD^vP*X"
    for ax, domain in zip(axes[0], domains):
        for i, (label, (speed, perplexities)) in enumerate(points.items()):
            ax.scatter([speed], [perplexities[domain]], marker=markers[i % len(markers)], s=60, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("decode tokens/s (batch 1, this machine)")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title(f"{domain}{' (unseen)' if domain in unseen else ''}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(4, len(labels)),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, -0.08),
    )
    fig.tight_layout()
    return _save(fig, path)


def make_plots(analysis_json: str | Path) -> dict[str, Path]:
    """All figures for one analysis.json, written next to it; returns {figure name: path}."""
    analysis_json = Path(analysis_json)
    analysis = json.loads(analysis_json.read_text())
    folder = analysis_json.parent
    written = {}
    for domain, scores in analysis["results"]["model"]["domains"].items():
        if "routing" in scores:
            written[f"load_{domain}"] = load_heatmap(domain, scores["routing"], folder / f"expert_load_{domain}.png")
            if scores["routing"]["top_k"] > 1:  # top-1 routing never co-activates
                written[f"coactivation_{domain}"] = coactivation_heatmaps(
                    domain, scores["routing"], folder / f"expert_coactivation_{domain}.png"
                )
    written["perplexity"] = perplexity_bars(analysis, folder / "perplexity.png")
    return written
