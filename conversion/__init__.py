"""llama_moe.conversion."""
