"""llama_moe.cli."""
