"""`clustering`: LLaMA-MoE's Independent-Clustering: balanced k-means over L2-normalized FFN rows.

Neurons whose up_proj (or gate_proj, --cluster-on) rows point the same way share an expert; every cluster has
exactly I/E neurons. With --router-init centroids the cluster centroids become the router rows.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import DenseFFN, ExpertInit, UpcycleMethod, option
from .random import experts_from_groups

CLUSTER_ON = ("up", "gate")


@dataclass
class ClusteringOptions:
    cluster_on: str = option("up", "which FFN rows to cluster", choices=CLUSTER_ON)


def balanced_assign(scores_NC: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy balanced assignment: take (neuron, cluster) pairs best score first, skipping full clusters and
    assigned neurons. Returns cluster index per neuron [N]; every cluster gets exactly `capacity` neurons."""
    num_neurons, num_clusters = scores_NC.shape
    order = torch.argsort(scores_NC.reshape(-1), descending=True)
    neuron_of, cluster_of = order // num_clusters, order % num_clusters
    assignment = [-1] * num_neurons
    fill = [0] * num_clusters
    remaining = num_neurons
    for n, c in zip(neuron_of.tolist(), cluster_of.tolist()):
        if assignment[n] >= 0 or fill[c] >= capacity:
            continue
        assignment[n] = c
        fill[c] += 1
        remaining -= 1
        if remaining == 0:
            break
    return torch.tensor(assignment)


def balanced_kmeans(points_NH: torch.Tensor, num_clusters: int, generator: torch.Generator, iterations: int = 15):
    """Equal-size spherical k-means. Returns (groups [C, N/C] sorted neuron indices, centroids [C, H])."""
    points_NH = points_NH.contiguous()  # carve passes a transposed view: gathering its rows was 4x slower
    num_points = points_NH.shape[0]
    capacity = num_points // num_clusters
    centroids_CH = points_NH[torch.randperm(num_points, generator=generator)[:num_clusters]].clone()
    assignment = None
    for _ in range(iterations):
        new_assignment = balanced_assign(points_NH @ centroids_CH.T, capacity)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for c in range(num_clusters):
            centroids_CH[c] = F.normalize(points_NH[assignment == c].mean(0), dim=0)
    groups = torch.stack([torch.nonzero(assignment == c).squeeze(1) for c in range(num_clusters)])
    return groups, centroids_CH


class ClusteringMethod(UpcycleMethod):
    name = "clustering"
    summary = "balanced k-means on normalized up/gate rows, one cluster per expert (LLaMA-MoE Independent-Clustering)"
    options = ClusteringOptions
    router_inits = (*UpcycleMethod.router_inits, "centroids", "fit")

    def check(self, dense_config, options) -> None:
        super().check(dense_config, options)
        if dense_config.intermediate_size % options.num_experts:
            raise ValueError(
                f"--method clustering makes {options.num_experts} equal clusters of the FFN's "
                f"{dense_config.intermediate_size} neurons, which does not divide; pick --num-experts dividing "
                f"{dense_config.intermediate_size}."
            )

    def config_changes(self, dense_config, options) -> dict:
        return {
            "moe_intermediate_size": dense_config.intermediate_size // options.num_experts,
            "routed_scaling_factor": options.num_experts / options.top_k,
        }

    def build(self, ffn: DenseFFN, options, generator: torch.Generator, layer_idx: int, context=None) -> ExpertInit:
        rows = ffn.up if options.cluster_on == "up" else ffn.gate
        groups, centroids_EH = balanced_kmeans(F.normalize(rows, dim=1), options.num_experts, generator)
        init = experts_from_groups(ffn, groups, groups[:0])
        if options.router_init == "centroids":
            # Unit centroids scaled to the rows' typical norm: router logits ~ the clusters' typical activation.
            init.router = centroids_EH * rows.norm(dim=1).mean()
        return init
