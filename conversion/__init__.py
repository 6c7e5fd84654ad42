"""llama_moe.conversion: dense Llama -> MoE upcycling (streamed to disk or in memory), and checkpoint formats.

Public: `upcycle` (writes a checkpoint folder, returns its path), `upcycle_in_memory` (behind
`LlamaMoEForCausalLM.from_dense`), `METHODS` (construction methods by name). Imports stay light until used.
"""

from .methods import METHODS
from .upcycle import upcycle, upcycle_in_memory

__all__ = ["upcycle", "upcycle_in_memory", "METHODS"]
