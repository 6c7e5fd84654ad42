"""The README.md model card of an upcycled or exported checkpoint: Hub metadata plus what was built, from what,
how, and which serving engines compute it as we do.

Reads only the plan and counts it is given; must not load weights or contact the Hub.
"""

import os

from .calibration import parse_calibration_sources
from .engines import engine_table_markdown
from .methods import GRANULAR_SCALING, METHODS


def method_option_names(method_name: str) -> list[str]:
    """The options the card lists for a method: its own, then --shared-experts where it splits off shared ones."""
    method = METHODS[method_name]
    return method.option_names() + (["shared_experts"] if method.supports_shared_experts else [])


def _yaml_list(items) -> str:
    return "\n".join(f"- {item}" for item in items)


def _usage_and_serving(format_name: str, config) -> list[str]:
    """The card sections every checkpoint we write has: how to load it, and which engines compute it as we do."""
    remote = ", trust_remote_code=True" if format_name == "llama_moe" else ""
    return [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO"{remote})',
        # transformers reads the model's config before the tokenizer's: it asks for trust_remote_code too.
        f'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO"{remote})',
        "```",
        "",
        "## Serving engines",
        "",
        engine_table_markdown(format_name, config),
        "",
    ]


def render_model_card(plan, *, format: str, total_params: int, active_params: int, command: str | None) -> str:
    c, o = plan.moe_config, plan.options
    base = plan.source.name
    method_options = {name: getattr(o, name) for name in method_option_names(o.method)}
    if plan.uses_calibration_text:
        sources = parse_calibration_sources(o.calibration_data)
        method_options.update(
            calibration_data=" + ".join(source.describe() for source in sources),
            calibration_tokens=o.calibration_tokens,
        )
    option_text = ", ".join(f"{k}={v}" for k, v in method_options.items()) or "none"
    dense_layers = c.num_hidden_layers - len(c.moe_layers)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"base_model: {base}" if "/" in base and not os.path.isabs(base) else f"# base_model: {base}",
        "tags:",
        _yaml_list(
            ["moe", "mixture-of-experts", "custom_code" if format == "llama_moe" else format, "upcycling", "llama-moe"]
        ),
        "---",
        "",
        f"# {os.path.basename(base.rstrip('/'))} upcycled to a Mixture of Experts ({o.method})",
        "",
        f"This model was made from the dense model `{base}` by **{o.method}** upcycling with "
        "`llama-moe`. It has not been trained after upcycling.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| method | `{o.method}` ({option_text}) |",
        f"| experts per MoE layer | {c.num_local_experts} routed"
        + (
            f" + shared expert of width {c.shared_expert_intermediate_size}"
            if c.shared_expert_intermediate_size
            else ""
        )
        + " |",
        f"| top-k | {c.num_experts_per_tok} (renormalized: {c.norm_topk_prob}, "
        f"routed scaling {c.routed_scaling_factor:g}) |",
        f"| expert width | {c.moe_intermediate_size} (dense FFN {c.intermediate_size})"
        + (
            f"; {plan.built_expert_width} neurons built, padded with zero neurons (they add nothing) so that weight "
            "rows span a multiple of 16 bytes, as grouped-GEMM kernels need"
            if plan.built_expert_width != c.moe_intermediate_size
            else ""
        )
        + " |",
        f"| MoE layers | {len(c.moe_layers)} of {c.num_hidden_layers}"
        + (f" ({dense_layers} stay dense)" if dense_layers else "")
        + " |",
        f"| parameters | {total_params / 1e6:,.1f}M total, {active_params / 1e6:,.1f}M active per token |",
        f"| router | init {o.router_init}"
        + (f" (temperature {c.router_temperature:g})" if c.router_temperature != 1 else "")
        + f", aux loss coef {c.router_aux_loss_coef}, capacity factor "
        f"{c.capacity_factor if c.capacity_factor is not None else 'none (dropless)'} |",
        f"| dtype, seed | {str(plan.dtype).replace('torch.', '')}, {o.seed} |",
        f"| format | `{format}` |",
        "",
    ]
    if o.method == "granular":
        lines += [f"Granular scaling `{o.granular_scaling}`: {GRANULAR_SCALING[o.granular_scaling]}.", ""]
    lines += _usage_and_serving(format, c)
    if command:
        language = "bash" if command.startswith("llama-moe ") else "python"
        lines += ["## How it was made", "", f"```{language}", command, "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str, plan, **kwargs) -> str:
    path = os.path.join(folder, "README.md")
    with open(path, "w") as f:
        f.write(render_model_card(plan, **kwargs))
    return path


def render_export_card(src: str, format_name: str, config) -> str:
    """The card of `llama-moe export`: where it came from, how to load it, which engines serve it exactly."""
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: text-generation",
            "tags:",
            _yaml_list(
                ["moe", "mixture-of-experts", "custom_code" if format_name == "llama_moe" else format_name, "llama-moe"]
            ),
            "---",
            "",
            f"# {os.path.basename(os.path.abspath(src))} ({format_name})",
            "",
            f"A Mixture-of-Experts checkpoint made with `llama-moe`, exported "
            f"to the `{format_name}` format from `{src}`: {config.num_local_experts} routed experts, top-"
            f"{config.num_experts_per_tok}"
            + (
                f", shared expert of width {config.shared_expert_intermediate_size}"
                if config.shared_expert_intermediate_size
                else ""
            )
            + ".",
            "",
            *_usage_and_serving(format_name, config),
        ]
    )
