"""Mixture sampling over domains: initial weights (static, proportional, uniform), the dynamic update, and the
resumable stream of training blocks drawn by those weights.

It must not tokenize or read files itself (training/data.py does) nor evaluate models (the trainer does).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import deque

import torch
from datasets import Features, IterableDataset, Sequence, Value

from llama_moe.conversion.atomic import atomic_write_text

from .data import StreamPosition

MIXTURE_STATE_NAME = "mixture_state.json"


def normalize(weights: dict[str, float], what: str = "--dataset_weights") -> dict[str, float]:
    bad = {name: w for name, w in weights.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise ValueError(f"{what}: weights must be finite and >= 0, got {bad}.")
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"{what}: weights {weights} do not sum to a positive number.")
    return {name: w / total for name, w in weights.items()}


def initial_weights(sampling: str, names: list[str], given: dict[str, float], sizes=None) -> dict[str, float]:
    """Start weights. `static`/`dynamic`: the given ones (uniform when none are given); `proportional`: by
    `sizes()` (called only then); `uniform`: equal."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"--dataset_weights names unknown domains {unknown}; the domains are {names}.")
    if sampling == "uniform" or (sampling in ("static", "dynamic") and not given):
        return {name: 1.0 / len(names) for name in names}
    if sampling == "proportional":
        return normalize(dict(zip(names, sizes())), "domain sizes")
    missing = sorted(set(names) - set(given))
    if missing:
        raise ValueError(f"--dataset_weights has no weight for domains {missing}; give every domain a weight.")
    return normalize({name: given[name] for name in names})


def dynamic_update(
    weights: dict[str, float], losses: dict[str, float], references: dict[str, float], eta: float, smoothing: float
) -> dict[str, float]:
    """Sheared-LLaMA / LLaMA-MoE dynamic batch loading:
    w <- normalize(w * exp(eta * max(0, loss - reference))), then w <- (1 - smoothing) * w + smoothing / k."""
    excess = {name: max(0.0, losses[name] - references[name]) for name in weights}
    # In log space, shifted by the largest exponent, so a large eta * excess cannot overflow.
    logits = {name: math.log(max(weights[name], 1e-300)) + eta * excess[name] for name in weights}
    top = max(logits.values())
    updated = normalize({name: math.exp(value - top) for name, value in logits.items()}, "dynamic weights")
    k = len(updated)
    return {name: (1.0 - smoothing) * w + smoothing / k for name, w in updated.items()}


class MixtureDataset(torch.utils.data.IterableDataset):
    """Endless stream of `{"input_ids": block}` drawn from domain streams by the current weights.

    Example `k` picks its domain with an RNG seeded by (seed, k), so the stream is a function of the weights and the
    position. `state_at(consumed)` gives the exact position after `consumed` examples even though the data loader
    has already drawn a few more (they are kept as `pending` and replayed first on resume).
    """

    column_names = ["input_ids"]  # lets TRL read the columns without drawing an example

    def __init__(self, streams: dict, weights: dict[str, float], seed: int):
        super().__init__()
        self.streams, self.names, self.seed = streams, list(streams), seed
        self.weights = dict(weights)
        self.start_positions = {name: None for name in self.names}  # None = start of training
        self.start_index, self.pending = 0, []
        self.drawn = {name: 0 for name in self.names}  # blocks drawn per domain (for logs)
        self._drawn_start = dict(self.drawn)
        self._records = deque()  # (index, domain, position after) of recently drawn examples
        self._base = {}

    def load_state(self, state: dict) -> None:
        if sorted(state["weights"]) != sorted(self.names):
            raise ValueError(
                f"the checkpoint's mixture has domains {sorted(state['weights'])} but this run has "
                f"{sorted(self.names)}; "
                "resume with the same domains."
            )
        self.weights = dict(state["weights"])
        self.start_positions = {
            name: None if pos is None else StreamPosition.from_list(pos) for name, pos in state["positions"].items()
        }
        self.start_index, self.pending = int(state["next_index"]), list(state["pending"])
        self.drawn = dict(state.get("drawn", self.drawn))
        self._drawn_start = dict(self.drawn)

    def _pick(self, index: int) -> str:
        draw = random.Random(self.seed * 1_000_003 + index).random()
        total = 0.0
        for name in self.names:
            total += self.weights[name]
            if draw < total:
                return name
        return self.names[-1]

    def __iter__(self):
        iterators = {name: self.streams[name].blocks(self.start_positions[name]) for name in self.names}
        self._records.clear()
        self._base = dict(self.start_positions)
        pending = deque(self.pending)
        number = self.start_index - len(self.pending)  # examples before this one in the whole run
        self.drawn = drawn = dict(self._drawn_start)
        while True:
            name = pending.popleft() if pending else self._pick(number)
            block, after = next(iterators[name])
            self._records.append((number, name, after))
            drawn[name] = drawn.get(name, 0) + 1
            number += 1
            while len(self._records) > 100_000:  # keep far more than the loader prefetches
                _, old_name, old_after = self._records.popleft()
                self._base[old_name] = old_after
            yield {"input_ids": block}

    def state_at(self, consumed: int) -> dict:
        """The mixture's state after the trainer consumed `consumed` examples of this stream."""
        if not self._records:  # nothing drawn in this run yet: the loaded state still holds
            positions, pending, next_index = dict(self.start_positions), list(self.pending), self.start_index
        else:
            positions, pending = dict(self._base), []
            for number, name, after in self._records:
                if number < consumed:
                    positions[name] = after
                else:
                    pending.append(name)
            next_index = self._records[-1][0] + 1
        return {
            "weights": self.weights,
            "positions": {n: None if p is None else p.to_list() for n, p in positions.items()},
            "next_index": next_index,
            "pending": pending,
            "drawn": self.drawn,
        }


def as_hf_iterable(mixture: MixtureDataset):
    """The mixture as a `datasets.IterableDataset` (what TRL's SFTTrainer accepts). The generator is a plain
    closure, which `datasets` never copies, so the state stays in `mixture`."""

    def generate():
        yield from mixture

    return IterableDataset.from_generator(generate, features=Features({"input_ids": Sequence(Value("int32"))}))


def save_state(folder: str, state: dict) -> None:
    atomic_write_text(os.path.join(folder, MIXTURE_STATE_NAME), json.dumps(state, indent=1))


def load_state(folder: str) -> dict | None:
    path = os.path.join(folder, MIXTURE_STATE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)
