"""llama_moe.conversion: dense Llama -> MoE upcycling (streamed to disk or in memory), and checkpoint formats.

Public: `upcycle` (writes a checkpoint folder, returns its path), `upcycle_in_memory` (behind
`LlamaMoEForCausalLM.from_dense`), `METHODS` (construction methods by name), `EXPORTERS` and
`export_checkpoint` (output formats: llama_moe, mixtral, qwen2_moe), `import_llama_moe_v1`.
"""

from .formats import EXPORTERS, export_checkpoint
from .llama_moe_v1 import import_llama_moe_v1
from .methods import METHODS
from .upcycle import upcycle, upcycle_in_memory

__all__ = ["upcycle", "upcycle_in_memory", "METHODS", "EXPORTERS", "export_checkpoint", "import_llama_moe_v1"]
