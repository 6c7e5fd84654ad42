"""Routing statistics of an MoE model from its router logits (`output_router_logits=True`), per MoE layer.

Accumulates counts over any number of forward passes and turns them into plain numbers (load per expert, its
coefficient of variation and entropy, top-1 agreement, expert co-selection); it never runs the model itself.
"""

import math

import torch


def routing_settings(config) -> tuple[list[int], int, int]:
    """(MoE layer indices, experts per layer, top-k) from a LlamaMoE / Mixtral-style config."""
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not num_experts or not top_k:
        raise ValueError(
            f"{type(config).__name__} has no num_local_experts/num_experts_per_tok: "
            "routing statistics need an MoE model."
        )
    layers = getattr(config, "moe_layers", None)
    if layers is None:
        layers = list(range(config.num_hidden_layers))
    return list(layers), int(num_experts), int(top_k)


class RoutingStats:
    """Running counts for every MoE layer: top-k selections, top-1 choices, pairwise co-selections and the
    summed router probabilities. Feed it `outputs.router_logits` (one [tokens, experts] tensor per MoE layer)."""

    def __init__(self, layers: list[int], num_experts: int, top_k: int):
        self.layers, self.num_experts, self.top_k = list(layers), num_experts, top_k
        shape = (len(self.layers), num_experts)
        self.selected_LE = torch.zeros(shape, dtype=torch.float64)
        self.top1_LE = torch.zeros(shape, dtype=torch.float64)
        self.prob_sum_LE = torch.zeros(shape, dtype=torch.float64)
        self.coselect_LEE = torch.zeros((len(self.layers), num_experts, num_experts), dtype=torch.float64)
        self.tokens = 0

    def update(self, router_logits) -> None:
        if router_logits is None or len(router_logits) != len(self.layers):
            got = 0 if router_logits is None else len(router_logits)
            raise ValueError(
                f"Expected router logits for {len(self.layers)} MoE layers, got {got}: "
                "call the model with output_router_logits=True."
            )
        for layer, logits_TE in enumerate(router_logits):
            logits_TE = logits_TE.detach().float().reshape(-1, self.num_experts).cpu()
            probs_TE = torch.softmax(logits_TE, dim=-1)
            top_index_TK = torch.topk(probs_TE, self.top_k, dim=-1).indices
            chosen_TE = torch.zeros_like(probs_TE).scatter_(1, top_index_TK, 1.0).double()
            self.selected_LE[layer] += chosen_TE.sum(0)
            self.top1_LE[layer] += torch.bincount(top_index_TK[:, 0], minlength=self.num_experts).double()
            self.prob_sum_LE[layer] += probs_TE.double().sum(0)
            self.coselect_LEE[layer] += chosen_TE.T @ chosen_TE
        self.tokens += router_logits[0].reshape(-1, self.num_experts).shape[0]

    def summary(self) -> dict:
        """Per layer: `token_fraction[e]` = share of tokens routed to e (sums to top-k); `load_share[e]` = share
        of routed slots (sums to 1, uniform = 1/E); `load_cv` = std/mean of the load; `load_entropy` (nats) and
        `load_entropy_normalized` (1 = uniform); `top1_agreement` = share of tokens whose top-1 expert is the
        layer's most common top-1 expert; `coselection[i][j]` = share of tokens routed to both i and j."""
        if self.tokens == 0:
            raise ValueError("No tokens were routed: nothing to summarize.")
        per_layer = {}
        for position, layer in enumerate(self.layers):
            selected_E = self.selected_LE[position]
            share_E = selected_E / selected_E.sum()
            nonzero = share_E[share_E > 0]
            entropy = float(-(nonzero * nonzero.log()).sum())
            per_layer[str(layer)] = {
                "token_fraction": (selected_E / self.tokens).tolist(),
                "load_share": share_E.tolist(),
                "load_cv": float(selected_E.std(unbiased=False) / selected_E.mean()),
                "load_entropy": entropy,
                "load_entropy_normalized": entropy / math.log(self.num_experts) if self.num_experts > 1 else 1.0,
                "top1_expert": int(self.top1_LE[position].argmax()),
                "top1_agreement": float(self.top1_LE[position].max() / self.tokens),
                "mean_router_prob": (self.prob_sum_LE[position] / self.tokens).tolist(),
                "coselection": (self.coselect_LEE[position] / self.tokens).tolist(),
            }
        return {
            "layers": self.layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "per_layer": per_layer,
        }
