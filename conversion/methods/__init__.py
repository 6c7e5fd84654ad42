"""Construction methods for upcycling, one module each, all following `base.UpcycleMethod`, registered in METHODS.

This package only maps dense FFN tensors to expert tensors; reading checkpoints and writing shards live in
reader.py / writer.py, and the per-layer driving loop in pipeline.py.
"""

from .base import DenseFFN, ExpertInit, UpcycleMethod, flag
from .carve import CarveMethod
from .clustering import ClusteringMethod
from .copy import CopyMethod
from .drop import DropMethod
from .gradient import GradientMethod
from .granular import GRANULAR_SCALING, GranularMethod
from .random import RandomMethod

METHODS: dict[str, UpcycleMethod] = {
    method.name: method
    for method in (
        CopyMethod(),
        RandomMethod(),
        ClusteringMethod(),
        GradientMethod(),
        GranularMethod(),
        DropMethod(),
        CarveMethod(),
    )
}


def get_method(name: str) -> UpcycleMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown upcycling method {name!r}; choose one of {', '.join(METHODS)}.") from None


__all__ = ["METHODS", "GRANULAR_SCALING", "get_method", "flag", "DenseFFN", "ExpertInit", "UpcycleMethod"]
