"""llama_moe.conversion: dense Llama -> MoE upcycling (streamed to disk or in memory), and checkpoint formats.

Public: `upcycle` (writes a checkpoint folder, returns its path), `upcycle_in_memory` (the MoE model built in
memory), `METHODS` (construction methods by name), `EXPORTERS` and `export_checkpoint` (output formats: llama_moe,
mixtral, qwen2_moe), `import_llama_moe_v1`. They are imported when first used, so `llama_moe.conversion.model_path`
and the other light modules that training and evaluation use do not load the whole package.
"""

import importlib
from typing import TYPE_CHECKING

# public name -> the module below this package that defines it
_PUBLIC = {
    "upcycle": "pipeline",
    "upcycle_in_memory": "pipeline",
    "METHODS": "methods",
    "EXPORTERS": "formats",
    "export_checkpoint": "formats",
    "import_llama_moe_v1": "llama_moe_v1",
}
__all__ = ["upcycle", "upcycle_in_memory", "METHODS", "EXPORTERS", "export_checkpoint", "import_llama_moe_v1"]

if TYPE_CHECKING:  # what the table above gives, for type checkers and readers (and the import-graph test)
    from .formats import EXPORTERS, export_checkpoint
    from .llama_moe_v1 import import_llama_moe_v1
    from .methods import METHODS
    from .pipeline import upcycle, upcycle_in_memory


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
