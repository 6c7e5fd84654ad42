"""report.md for one model from `analysis.json` (and `eval/results.json` when present): numbers and figures.

Reads only the files the analysis and evaluation wrote and links the PNGs by relative path; it computes
nothing new beyond ratios and deltas of numbers already in those files.
"""

import json
import os
from pathlib import Path

from llama_moe.conversion.atomic import atomic_write_text

from .plots import coactivation_layers


def _millions(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.2f} M"


def _parameters_section(results: dict) -> list[str]:
    lines = [
        "## Parameters",
        "",
        "| model | total | active per token | routed experts | embedding |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, result in results.items():
        p = result["parameters"]
        lines.append(
            f"| {label} | {_millions(p['total'])} | {_millions(p['active'])} | "
            f"{_millions(p['routed_experts'])} | {_millions(p['embedding'])} |"
        )
    return lines + [""]


def _speed_section(results: dict) -> list[str]:
    if not all("speed" in r for r in results.values()):
        return []
    lines = [
        "## Generation speed",
        "",
        "Batch 1, greedy, KV cache; medians of repeated `generate()` calls in one run.",
        "",
        "| model | prefill tokens/s | decode tokens/s | prompt tokens | new tokens | device |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, result in results.items():
        s = result["speed"]
        lines.append(
            f"| {label} | {s['prefill_tokens_per_s']:,.1f} | {s['decode_tokens_per_s']:,.1f} | "
            f"{s['prompt_tokens']} | {s['new_tokens']} | {s['device']} ({s['threads']} threads) |"
        )
    if "base" in results:
        m, b = results["model"]["speed"], results["base"]["speed"]
        lines += [
            "",
            f"MoE / base: prefill {m['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f}x, "
            f"decode {m['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x.",
        ]
    return lines + [""]


def _perplexity_section(results: dict, unseen: list[str]) -> list[str]:
    has_base = "base" in results
    header = "| domain | tokens | perplexity |" + (" base perplexity | change |" if has_base else "")
    lines = ["## Perplexity", ""]
    if unseen:
        lines += [
            f"{', '.join(unseen)}: English prose that no calibration or training of llama-moe reads (Botchan, "
            "Project Gutenberg #8868): how the model does on text it was not built for.",
            "",
        ]
    lines += [header, "|---|---:|---:|" + ("---:|---:|" if has_base else "")]
    for domain, scores in results["model"]["domains"].items():
        row = f"| {domain}{' (unseen)' if domain in unseen else ''} | {scores['tokens']} | {scores['perplexity']:.4g} |"
        if has_base:
            base = results["base"]["domains"][domain]["perplexity"]
            ratio = scores["perplexity"] / base
            row += f" {base:.4g} | " + (f"{100 * (ratio - 1):+.2f} % |" if ratio < 10 else f"{ratio:,.3g}x |")
        lines.append(row)
    lines += ["", "![perplexity per domain](perplexity.png)", ""]
    if all("cloze" in result for result in results.values()):
        lines += [
            "Cloze task on the unseen prose (which of four words ends the sentence; chance 0.25):",
            "",
            "| model | accuracy | items |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {label} | {r['cloze']['acc']:.3f} ± {r['cloze']['acc_stderr'] or 0:.3f} | {r['cloze']['items']} |"
            for label, r in results.items()
        ]
        lines.append("")
    return lines


def _trade_off_section(results: dict) -> list[str]:
    """Quality against speed, both as ratios to the base measured in the same run."""
    if "base" not in results or not all("speed" in r for r in results.values()):
        return []
    model, base = results["model"], results["base"]
    ratios = ", ".join(
        f"{d} {model['domains'][d]['perplexity'] / base['domains'][d]['perplexity']:.2f}x" for d in model["domains"]
    )
    speed = model["speed"]["decode_tokens_per_s"] / base["speed"]["decode_tokens_per_s"]
    active = model["parameters"]["active"] / base["parameters"]["active"]
    return [
        "## Trade-off",
        "",
        f"Against the base, same run: perplexity {ratios}; decode speed {speed:.2f}x; active parameters {active:.2f}x.",
        "",
    ]


def _routing_section(results: dict) -> list[str]:
    lines = [
        "## Routing",
        "",
        "Per MoE layer: load CV (std/mean of tokens per expert; 0 = perfectly balanced), normalized load "
        "entropy (1 = uniform), top-1 agreement (share of tokens whose first choice is the layer's most "
        "common expert), and the most and least used experts with their share of routed slots.",
        "",
    ]
    for domain, scores in results["model"]["domains"].items():
        routing = scores.get("routing")
        if routing is None:
            continue
        lines += [
            f"### {domain}",
            "",
            "| layer | load CV | entropy (norm.) | top-1 agreement | most used | least used |",
            "|---:|---:|---:|---:|---|---|",
        ]
        for layer in routing["layers"]:
            stats = routing["per_layer"][str(layer)]
            share = stats["load_share"]
            most, least = max(range(len(share)), key=share.__getitem__), min(range(len(share)), key=share.__getitem__)
            lines.append(
                f"| {layer} | {stats['load_cv']:.3f} | {stats['load_entropy_normalized']:.3f} | "
                f"{stats['top1_agreement']:.3f} | {most} ({share[most]:.3f}) | {least} ({share[least]:.3f}) |"
            )
        lines += ["", f"![expert load, {domain}](expert_load_{domain}.png)", ""]
        if routing["top_k"] > 1:
            lines += [
                f"Co-activation: how often expert j is chosen when expert i is, for layers "
                f"{', '.join(str(layer) for layer in coactivation_layers(routing['layers']))}.",
                "",
                f"![expert co-activation, {domain}](expert_coactivation_{domain}.png)",
                "",
            ]
    return lines


def _eval_section(eval_json: Path, relative_to: Path) -> list[str]:
    if not eval_json.is_file():
        return []
    markdown = eval_json.with_suffix(".md")
    link = Path(os.path.relpath(markdown.resolve(), relative_to.resolve()))
    data = json.loads(eval_json.read_text())
    lines = ["## Benchmarks (lm-evaluation-harness)", ""]
    if "comparison" in data:
        lines += ["| task | metric | value | base | delta |", "|---|---|---:|---:|---:|"]
        lines += [
            f"| {r['task']} | {r['metric']} | {r['moe']:.4f} | {r['base']:.4f} | {r['delta']:+.4f} |"
            for r in data["comparison"]
        ]
    else:
        lines += ["| task | metric | value |", "|---|---|---:|"]
        for task, metrics in data["model"]["scores"].items():
            lines += [
                f"| {task} | {metric} | {value:.4f} |"
                for metric, value in metrics.items()
                if "_stderr" not in metric and metric != "sample_len"
            ]
    return lines + ["", f"Full table: [{markdown.name}]({link.as_posix()})", ""]


def write_report(analysis_json: str | Path, eval_json: str | Path | None = None) -> Path:
    """report.md next to analysis.json. `eval_json` defaults to MODEL/eval/results.json when it exists."""
    analysis_json = Path(analysis_json)
    analysis = json.loads(analysis_json.read_text())
    results = analysis["results"]
    config = analysis["config"]
    lines = [f"# Analysis of `{analysis['model']}`", ""]
    if analysis.get("base"):
        lines += [f"Dense base for comparison: `{analysis['base']}`.", ""]
    lines += [
        f"{config.get('num_local_experts')} experts per MoE layer, top-{config.get('num_experts_per_tok')}, "
        f"MoE layers {config.get('moe_layers', 'all')} of {config.get('num_hidden_layers')}; "
        f"at most {analysis['settings']['max_tokens']} tokens per domain "
        f"({', '.join(f'{k}: `{v}`' for k, v in analysis['data'].items())}).",
        "",
    ]
    unseen = analysis.get("unseen_domains", [])
    lines += _parameters_section(results) + _perplexity_section(results, unseen) + _speed_section(results)
    lines += _trade_off_section(results)
    lines += _routing_section(results)
    if eval_json is None and Path(analysis["model"]).is_dir():
        eval_json = Path(analysis["model"]) / "eval" / "results.json"
    if eval_json is not None:
        lines += _eval_section(Path(eval_json), analysis_json.parent)
    lines += ["All numbers: [analysis.json](analysis.json).", ""]
    return atomic_write_text(analysis_json.parent / "report.md", "\n".join(lines))
