"""The one upcycling core: plan (every check, before any output), then stream the MoE tensors layer by layer.

`upcycle()` writes a checkpoint folder (CLI `llama-moe upcycle`), `upcycle_in_memory()` builds the model in RAM
(`llama-moe train --upcycle_from`); both run `plan_upcycle` + `iter_moe_tensors`. Must not contain method
math (conversion/methods/), file formats (writer.py, formats.py) or argument parsing (cli/upcycle.py).
"""

import copy
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llama_moe.modeling import LlamaMoEConfig, LlamaMoEForCausalLM
from llama_moe.modeling.modeling_llama_moe import LlamaMoESparseMoeBlock
from llama_moe.modeling.parameters import config_parameter_counts

from .atomic import refuse_existing_output
from .calibration import LayerwiseCalibration, mixture_blocks, parse_calibration_sources
from .formats import LlamaMoEExporter, get_exporter, write_checkpoint
from .gguf_export import check_gguf_fit, check_gguf_output, check_gguf_tokenizer, export_gguf, outtype_of
from .methods import DenseFFN, UpcycleMethod, get_method
from .model_card import write_model_card
from .options import DTYPES, UpcycleOptions, check_common, resolve_moe_layers
from .output_scale import routed_output_scale
from .reader import CONFIG_KEYS_TO_DROP, DenseSource, layer_of, open_dense
from .router_fit import FIT_TEMPERATURE, fit_router
from .verify import verify_upcycled
from .writer import parse_size


@dataclass
class UpcyclePlan:
    """Everything decided before any tensor is read: what to read, what to build, every output's shape."""

    source: DenseSource
    options: UpcycleOptions  # resolved: router_std, router_init and calibration_tokens filled in
    method: UpcycleMethod
    moe_config: LlamaMoEConfig
    moe_layers: list[int]
    dtype: torch.dtype
    # Our layout, in streaming order: (name, shape); an MoE layer's tensors sit where its dense MLP was.
    tensors: list[tuple[str, tuple]]
    # Streaming steps: ("copy", source_name) or ("moe", layer_idx).
    steps: list[tuple[str, object]]

    @property
    def built_expert_width(self) -> int:
        """The routed expert width the method chose; the config's is that rounded up to EXPERT_WIDTH_MULTIPLE."""
        return method_expert_width(self.method.config_changes(self.source.config, self.options), self.source.config)

    @property
    def layerwise_calibration(self) -> bool:
        """Whether layers are built from their inputs on calibration text (a calibrated method, a fitted router)."""
        return self.method.calibrated or self.options.router_init == "fit"

    @property
    def uses_calibration_text(self) -> bool:
        return self.layerwise_calibration or self.method.reads_calibration_text


def moe_tensor_shapes(config: LlamaMoEConfig, layer: int) -> list[tuple[str, tuple]]:
    E, H, I = config.num_local_experts, config.hidden_size, config.moe_intermediate_size
    prefix = f"model.layers.{layer}.mlp."
    shapes = [
        (prefix + "gate.weight", (E, H)),
        (prefix + "experts.gate_up_proj", (E, 2 * I, H)),
        (prefix + "experts.down_proj", (E, H, I)),
    ]
    S = config.shared_expert_intermediate_size
    if S:
        shapes += [
            (prefix + "shared_expert.gate_proj.weight", (S, H)),
            (prefix + "shared_expert.up_proj.weight", (S, H)),
            (prefix + "shared_expert.down_proj.weight", (H, S)),
        ]
    return shapes


# Routed expert widths are rounded up to a multiple of this many neurons, the extra ones all zero: grouped-GEMM kernels
# (transformers' default "grouped_mm" experts, as Qwen2-MoE and Mixtral use them) need every weight row to span a
# multiple of 16 bytes, which 8 neurons give in every dtype. A zero neuron adds exactly nothing (silu(0) * 0 and a
# zero down column) and its gradients are zero, so it stays inert in training.
EXPERT_WIDTH_MULTIPLE = 8


def aligned_expert_width(width: int) -> int:
    return -(-width // EXPERT_WIDTH_MULTIPLE) * EXPERT_WIDTH_MULTIPLE


def pad_expert_width(gate_up_EFH: torch.Tensor, down_EHW: torch.Tensor, width: int):
    """Experts of width W' -> width `width` >= W' with zero neurons (gate and up rows, down columns)."""
    built = down_EHW.shape[-1]
    if built == width:
        return gate_up_EFH, down_EHW
    E, _, H = gate_up_EFH.shape
    rows = gate_up_EFH.new_zeros(E, width - built, H)
    gate_up = torch.cat([gate_up_EFH[:, :built], rows, gate_up_EFH[:, built:], rows], dim=1)
    down = torch.cat([down_EHW, down_EHW.new_zeros(E, down_EHW.shape[1], width - built)], dim=2)
    return gate_up, down


def method_expert_width(changes: dict, dense_config) -> int:
    """The routed expert width in a method's config changes: the dense FFN's unless the method says otherwise."""
    return changes.get("moe_intermediate_size", dense_config.intermediate_size)


def build_moe_config(
    dense_config, options: UpcycleOptions, method: UpcycleMethod, dtype: torch.dtype
) -> LlamaMoEConfig:
    changes = method.config_changes(dense_config, options)
    fields = {k: v for k, v in dense_config.to_dict().items() if k not in CONFIG_KEYS_TO_DROP}
    fields.update(
        num_local_experts=options.num_experts,
        num_experts_per_tok=options.top_k,
        moe_layers=resolve_moe_layers(options.moe_layers, dense_config.num_hidden_layers),
        moe_intermediate_size=aligned_expert_width(method_expert_width(changes, dense_config)),
        shared_expert_intermediate_size=changes.get("shared_expert_intermediate_size", 0),
        norm_topk_prob=options.norm_topk_prob
        if options.norm_topk_prob is not None
        else changes.get("norm_topk_prob", True),
        routed_scaling_factor=float(
            options.routed_scaling_factor
            if options.routed_scaling_factor is not None
            else changes.get("routed_scaling_factor", 1.0)
        ),
        router_aux_loss_coef=options.aux_loss_coef,
        capacity_factor=options.capacity_factor,
        router_temperature=FIT_TEMPERATURE if options.router_init == "fit" else 1.0,
    )
    config = LlamaMoEConfig(**fields)
    config.architectures = ["LlamaMoEForCausalLM"]
    config.dtype = dtype
    return config


def plan_upcycle(base, options: UpcycleOptions) -> UpcyclePlan:
    """Open and check the base model and the options; decide the config and every output tensor's shape."""
    method = get_method(options.method)
    options = replace(
        options,
        router_init=options.router_init or method.router_inits[0],
        calibration_tokens=options.calibration_tokens or method.default_calibration_tokens,
    )
    check_common(options)  # before the (possibly slow) read: opening a .gguf file dequantizes it
    source = base if isinstance(base, DenseSource) else open_dense(base)
    dense_config = source.config
    default_std = float(dense_config.initializer_range)
    options = replace(options, router_std=options.router_std if options.router_std is not None else default_std)
    resolve_moe_layers(options.moe_layers, dense_config.num_hidden_layers)
    method.check(dense_config, options)
    dtype = source.dtype if options.dtype == "auto" else DTYPES[options.dtype]
    moe_config = build_moe_config(dense_config, options, method, dtype)
    moe_layers = list(moe_config.moe_layers)

    tensors, steps, seen_moe = [], [], set()
    for name in source.keys():
        if name == "lm_head.weight" and dense_config.tie_word_embeddings:
            continue  # tied to the embeddings (a GGUF state dict lists it anyway)
        layer = layer_of(name)
        if layer in moe_layers and name.startswith(f"model.layers.{layer}.mlp."):
            if layer not in seen_moe:
                seen_moe.add(layer)
                steps.append(("moe", layer))
                tensors += moe_tensor_shapes(moe_config, layer)
            continue
        steps.append(("copy", name))
        tensors.append((name, source.shape(name)))
    return UpcyclePlan(source, options, method, moe_config, moe_layers, dtype, tensors, steps)


def layer_generator(seed: int, layer: int) -> torch.Generator:
    """One generator per layer, so a layer's experts do not depend on which other layers were converted."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)


def open_calibration(plan: UpcyclePlan):
    """The dense model streamed over the calibration mixture (conversion/calibration.py)."""
    tokenizer = plan.source.load_tokenizer()
    if tokenizer is None:
        raise ValueError(f"calibration needs the base model's tokenizer, and {plan.source.name} has none.")
    options = plan.options
    sources = parse_calibration_sources(options.calibration_data)
    blocks = mixture_blocks(sources, options.calibration_tokens, plan.source, tokenizer, options.seed)
    return LayerwiseCalibration(plan.source, blocks)


def moe_block(config: LlamaMoEConfig, tensors: list[tuple[str, torch.Tensor]]):
    """The MoE block the model will run, in float32, from one layer's tensors (to carry calibration on)."""
    config = copy.deepcopy(config)
    config._experts_implementation = "dropless"
    with torch.device("meta"):
        block = LlamaMoESparseMoeBlock(config)
    state = {name.split(".mlp.", 1)[1]: tensor.float() for name, tensor in tensors}
    block.load_state_dict(state, assign=True)
    return block.eval()


def build_moe_layer(plan: UpcyclePlan, layer: int, context=None, calibration=None) -> list[tuple[str, torch.Tensor]]:
    """Read one dense FFN, run the method, return the layer's MoE tensors (our names). With calibration, the
    method and the router fit see the layer's inputs, and the calibration goes on through the layer built."""
    prefix = f"model.layers.{layer}.mlp."
    ffn = DenseFFN(*(plan.source.get(f"{prefix}{p}_proj.weight").float() for p in ("gate", "up", "down")))
    if calibration is not None:
        ffn.inputs = calibration.ffn_inputs(layer)
    generator = layer_generator(plan.options.seed, layer)
    init = plan.method.build(ffn, plan.options, generator, layer, context)
    init.gate_up, init.down = pad_expert_width(init.gate_up, init.down, plan.moe_config.moe_intermediate_size)
    router = init.router
    if plan.options.router_init == "fit":
        router = fit_router(init.gate_up, init.down, ffn.inputs)
    elif router is None:
        E, H = plan.moe_config.num_local_experts, plan.moe_config.hidden_size
        router = torch.randn(E, H, generator=generator) * plan.options.router_std
        if plan.options.router_init == "zeros":
            router = torch.zeros(E, H)
    # Expert tensors stay as the method made them (copy: broadcast views); consumers cast expert by expert.
    out = [
        (prefix + "gate.weight", router.to(plan.dtype)),
        (prefix + "experts.gate_up_proj", init.gate_up),
        (prefix + "experts.down_proj", init.down),
    ]
    if plan.moe_config.shared_expert_intermediate_size:
        shared = init.shared
        out += [
            (prefix + "shared_expert.gate_proj.weight", shared.gate.to(plan.dtype)),
            (prefix + "shared_expert.up_proj.weight", shared.up.to(plan.dtype)),
            (prefix + "shared_expert.down_proj.weight", shared.down.to(plan.dtype)),
        ]
    if calibration is not None:
        block = moe_block(plan.moe_config, out)
        if plan.method.fits_output_scale(plan.options):
            scale = routed_output_scale(block, ffn)
            out[2] = (prefix + "experts.down_proj", (init.down.float() * scale).to(init.down.dtype))
            block = moe_block(plan.moe_config, out)
        calibration.finish(layer, block)
    return out


def iter_moe_tensors(plan: UpcyclePlan, progress: bool = True):
    """Yield (name, tensor) of the MoE model in plan order, one dense layer in memory at a time. Expert tensors
    may be float32 broadcast views: cast them piece by piece (the writer does), never whole."""
    context = plan.method.prepare(plan.source, plan.options, plan.moe_layers)
    calibration = open_calibration(plan) if plan.layerwise_calibration else None
    bar = tqdm(total=len(plan.moe_layers), desc=f"Upcycling ({plan.method.name})", unit="layer", disable=not progress)
    for kind, what in plan.steps:
        if kind == "copy":
            yield what, plan.source.get(what).to(plan.dtype)
        else:
            yield from build_moe_layer(plan, what, context, calibration)
            bar.update(1)
    bar.close()


@dataclass
class UpcycleResult:
    path: str
    plan: UpcyclePlan
    bytes_written: int
    num_files: int
    seconds: float
    total_params: int
    active_params: int
    verify: dict | None = None

    def summary(self) -> str:
        c = self.plan.moe_config
        return (
            f"Wrote {self.path}: {self.plan.method.name} upcycling of {self.plan.source.name}, "
            f"{len(self.plan.moe_layers)}/{c.num_hidden_layers} MoE layers x {c.num_local_experts} experts "
            f"(top-{c.num_experts_per_tok}), {self.total_params / 1e6:.1f}M params ({self.active_params / 1e6:.1f}M "
            f"active), {self.bytes_written / 1e9:.2f} GB in {self.num_files} shard(s), {self.seconds:.1f}s."
        )


def run_upcycle(
    base,
    out,
    options: UpcycleOptions,
    *,
    format: str = "llama_moe",
    max_shard_size="5GB",
    overwrite: bool = False,
    verify: bool = False,
    command: str | None = None,
    progress: bool = True,
    engine: str | None = None,
    gguf_tokenizer_pre: str | None = None,
) -> UpcycleResult:
    """`upcycle` with its statistics. All checks run before the output folder is created. `format="gguf"`: `out`
    is a .gguf file, written from a llama_moe folder staged beside it (removed afterwards)."""
    start = time.perf_counter()
    shard_bytes = parse_size(max_shard_size)  # a bad size is refused before the dense model is opened
    out = os.path.abspath(os.fspath(out))
    if format == "gguf":
        check_gguf_output(Path(out), overwrite)
    else:
        refuse_existing_output(out, overwrite)
    plan = plan_upcycle(base, options)
    staging = None
    if format == "gguf":
        check_gguf_fit(plan.moe_config, engine)
        staging = tempfile.mkdtemp(prefix=os.path.basename(out) + ".staging-", dir=os.path.dirname(out))
        exporter = LlamaMoEExporter(plan.moe_config)
    else:
        exporter = get_exporter(format, plan.moe_config, engine)
    counts = config_parameter_counts(plan.moe_config)
    total, active = counts["total"], counts["active"]

    def finish(folder: str) -> None:
        plan.source.close()
        plan.source.save_tokenizer(folder)
        write_model_card(folder, plan, format=format, total_params=total, active_params=active, command=command)

    try:
        if staging is not None:  # the tokenizer must fit the GGUF file before the heavy work starts
            os.mkdir(os.path.join(staging, "tokenizer"))
            plan.source.save_tokenizer(os.path.join(staging, "tokenizer"))
            check_gguf_tokenizer(Path(staging) / "tokenizer", gguf_tokenizer_pre)
        folder = out if staging is None else os.path.join(staging, "moe")
        written = write_checkpoint(
            [(name, shape, plan.dtype) for name, shape in plan.tensors],
            iter_moe_tensors(plan, progress=progress),
            exporter,
            folder,
            finish=finish,
            max_shard_size=shard_bytes,
            overwrite=overwrite,
        )
        result = UpcycleResult(
            path=out,
            plan=plan,
            bytes_written=written.bytes_written,
            num_files=written.num_shards,
            seconds=0.0,
            total_params=total,
            active_params=active,
        )
        if verify:
            # The dense model already opened (no second GGUF parse).
            result.verify = verify_upcycled(plan.source, folder)
        if staging is not None:
            export_gguf(
                folder,
                out,
                outtype=outtype_of(plan.dtype),
                tokenizer_pre=gguf_tokenizer_pre,
                overwrite=overwrite,
                progress=progress,
            )
            result.bytes_written, result.num_files = os.path.getsize(out), 1
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


def upcycle(
    base,
    out,
    method: str = "copy",
    num_experts: int = 8,
    top_k: int = 2,
    *,
    format: str = "llama_moe",
    max_shard_size="5GB",
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
    engine: str | None = None,
    gguf_tokenizer_pre: str | None = None,
    **moe_options,
) -> str:
    """Convert a dense Llama checkpoint (folder, .gguf file, Hub id or LlamaForCausalLM) into an MoE checkpoint
    folder `out`; returns its path. `moe_options` are the fields of `UpcycleOptions`: the common ones (moe_layers,
    shared_experts, norm_topk_prob, routed_scaling_factor, capacity_factor, aux_loss_coef, router_init, router_std,
    dtype, seed) and the chosen method's own (its `options` dataclass in conversion/methods/)."""
    options = UpcycleOptions.from_kwargs(method=method, num_experts=num_experts, top_k=top_k, **moe_options)
    arguments = dict(method=method, num_experts=num_experts, top_k=top_k, **moe_options)
    if format != "llama_moe":
        arguments["format"] = format
    if engine is not None:
        arguments["engine"] = engine
    base_text = repr(os.fspath(base)) if isinstance(base, (str, os.PathLike)) else type(base).__name__
    command = "from llama_moe.conversion import upcycle\nupcycle({}, {!r}, {})".format(
        base_text, os.fspath(out), ", ".join(f"{k}={v!r}" for k, v in arguments.items())
    )
    return run_upcycle(
        base,
        out,
        options,
        format=format,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        verify=verify,
        command=command,
        progress=progress,
        engine=engine,
        gguf_tokenizer_pre=gguf_tokenizer_pre,
    ).path


def upcycle_in_memory(dense_model_or_path, model_class=None, progress: bool = False, **moe_options):
    """Online upcycling: the MoE model built in memory (same tensors `upcycle` would write)."""
    if model_class is None:
        model_class = LlamaMoEForCausalLM
    options = UpcycleOptions.from_kwargs(**moe_options)
    plan = plan_upcycle(dense_model_or_path, options)
    state = {}
    for name, tensor in iter_moe_tensors(plan, progress=progress):
        # Own the memory: broadcast copies become real, trainable tensors, and nothing is shared with the dense model.
        cast = tensor.to(plan.dtype)
        fresh = cast is not tensor and cast.is_contiguous()
        state[name] = cast if fresh else cast.clone(memory_format=torch.contiguous_format)
    with torch.device("meta"):
        model = model_class(plan.moe_config)
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set(model.all_tied_weights_keys) if plan.moe_config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"upcycled state does not fit the model: missing {missing}, unexpected {result.unexpected_keys}"
        )
    # Non-persistent buffers (rotary inv_freq) were created on the meta device: rebuild them.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=plan.moe_config)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"buffers left on the meta device after upcycling: {leftover}")
    model.tie_weights()
    model.eval()
    return model
