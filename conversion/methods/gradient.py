"""`gradient`: LLaMA-MoE's gradient-importance construction (Sharing-Inner; Sharing-Inter with shared experts).

Calibration tokens are clustered per MoE layer into E groups by the FFN input (what the router will see); for each
group every intermediate neuron gets the importance sum |a * dL/da| (a = act(gate) * up, L = the LM loss on the
calibration text); expert j keeps the --expert-size most important neurons of group j (experts may share
neurons). With --shared-experts N, the neurons most groups rank high form an always-on shared expert (N experts
wide) and the experts choose among the rest. Only `prepare` runs the model; `build` only selects neurons.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..calibration import mixture_blocks, parse_calibration_sources
from .base import DenseFFN, ExpertInit, UpcycleMethod, option, stack_experts
from .clustering import balanced_kmeans

SEQUENCE_LENGTH = 128


@dataclass
class GradientOptions:
    expert_size: int | None = option(None, "neurons per expert (default I / (E + shared))", type=int)


def calibration_batches(source, tokenizer, options) -> list[torch.Tensor]:
    sources = parse_calibration_sources(options.calibration_data)
    blocks = mixture_blocks(sources, options.calibration_tokens, source, tokenizer, options.seed, SEQUENCE_LENGTH)
    return list(blocks.split(8, dim=0))


def neuron_importance(model, batches, moe_layers, num_groups: int, generator: torch.Generator):
    """Per MoE layer: (importance [groups, I], centroids [groups, H]) from two passes over the calibration text."""
    layers = model.model.layers
    inputs = {i: [] for i in moe_layers}
    hooks = [
        layers[i].mlp.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].detach().flatten(0, 1)))
        for i in moe_layers
    ]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for hook in hooks:
        hook.remove()

    groups, centroids = {}, {}
    for i in moe_layers:
        tokens_TH = F.normalize(torch.cat(inputs[i]).float(), dim=-1)
        members, centroids[i] = balanced_kmeans(tokens_TH, num_groups, generator)
        assignment = torch.empty(tokens_TH.shape[0], dtype=torch.long)
        for g, idx in enumerate(members):
            assignment[idx] = g
        leftover = tokens_TH.shape[0] - members.numel()  # tokens beyond an equal split join their nearest group
        if leftover:
            done = torch.zeros(tokens_TH.shape[0], dtype=torch.bool)
            done[members.reshape(-1)] = True
            assignment[~done] = (tokens_TH[~done] @ centroids[i].T).argmax(1)
        groups[i] = assignment
    inputs.clear()  # the FFN inputs of every MoE layer: free them before the second pass

    intermediate = model.config.intermediate_size
    importance = {i: torch.zeros(num_groups, intermediate) for i in moe_layers}
    offset = [0]

    def capture(layer):
        def hook(module, args):
            a_TI = args[0]
            if a_TI.requires_grad:
                start = offset[0]

                def accumulate(grad):
                    a = a_TI.detach().flatten(0, 1).float()
                    g = grad.flatten(0, 1).float()
                    index = groups[layer][start : start + a.shape[0]]
                    importance[layer].index_add_(0, index, (a * g).abs())

                a_TI.register_hook(accumulate)

        return hook

    hooks = [layers[i].mlp.down_proj.register_forward_pre_hook(capture(i)) for i in moe_layers]
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)  # gradients of activations only
    try:
        for ids in batches:
            embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=ids).loss
            loss.backward()
            offset[0] += ids.numel()
    finally:
        for hook in hooks:
            hook.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
    return {i: (importance[i], centroids[i]) for i in moe_layers}


def select_neurons(importance_GI: torch.Tensor, expert_size: int, shared_size: int):
    """(expert neuron indices [E, expert_size], shared neuron indices [shared_size]) from group importances."""
    num_groups, num_neurons = importance_GI.shape
    shared = torch.empty(0, dtype=torch.long)
    available = torch.ones(num_neurons, dtype=torch.bool)
    if shared_size:
        # Sharing-Inter: neurons in many groups' top lists are always on (ties broken by total importance).
        top = importance_GI.topk(expert_size, dim=1).indices
        votes = torch.zeros(num_neurons).index_add_(0, top.reshape(-1), torch.ones(top.numel()))
        total = importance_GI.sum(0)
        score = votes * (total.max() + 1) + total
        shared = score.topk(shared_size).indices.sort().values
        available[shared] = False
    masked = importance_GI.masked_fill(~available, -1.0)
    experts = masked.topk(expert_size, dim=1).indices.sort(dim=1).values
    return experts, shared


class GradientMethod(UpcycleMethod):
    name = "gradient"
    summary = "per-group top neurons by |activation x gradient| on calibration text (LLaMA-MoE Sharing-Inner/Inter)"
    options = GradientOptions
    supports_shared_experts = True
    router_inits = (*UpcycleMethod.router_inits, "centroids", "fit")
    default_calibration_tokens = 4096
    reads_calibration_text = True

    def _expert_size(self, dense_config, options) -> int:
        return options.expert_size or dense_config.intermediate_size // (options.num_experts + options.shared_experts)

    def check(self, dense_config, options) -> None:
        super().check(dense_config, options)
        if options.calibration_tokens < SEQUENCE_LENGTH:
            raise ValueError(f"--calibration-tokens must be >= {SEQUENCE_LENGTH}, got {options.calibration_tokens}.")
        size, I = self._expert_size(dense_config, options), dense_config.intermediate_size
        shared = options.shared_experts * size
        if size < 1 or size + shared > I:
            raise ValueError(
                f"--expert-size {size} with {options.shared_experts} shared expert(s) of that size does not fit the "
                f"FFN's {I} neurons: need expert_size * (1 + shared_experts) <= {I}."
            )

    def config_changes(self, dense_config, options) -> dict:
        size = self._expert_size(dense_config, options)
        routed_neurons = dense_config.intermediate_size - options.shared_experts * size
        return {
            "moe_intermediate_size": size,
            "shared_expert_intermediate_size": options.shared_experts * size,
            # The active experts cover k*size of the routed neurons: scale back to all of them (E/k when
            # size = I/E, LLaMA-MoE's rule).
            "routed_scaling_factor": routed_neurons / (options.top_k * size),
        }

    def prepare(self, source, options, moe_layers):
        tokenizer = source.load_tokenizer()
        if tokenizer is None:
            raise ValueError(f"--method gradient needs the base model's tokenizer, and {source.name} has none.")
        batches = calibration_batches(source, tokenizer, options)
        generator = torch.Generator().manual_seed(options.seed)
        model = source.dense_model()
        return neuron_importance(model, batches, moe_layers, options.num_experts, generator)

    def build(self, ffn: DenseFFN, options, generator: torch.Generator, layer_idx: int, context=None) -> ExpertInit:
        importance_EI, centroids_EH = context[layer_idx]
        size = importance_EI.shape[1] // (options.num_experts + options.shared_experts)
        size = options.expert_size or size
        experts, shared = select_neurons(importance_EI, size, options.shared_experts * size)
        gate_up, down = stack_experts([ffn.select(idx) for idx in experts])
        init = ExpertInit(gate_up=gate_up, down=down, shared=ffn.select(shared) if shared.numel() else None)
        if options.router_init == "centroids":
            init.router = centroids_EH
        return init
