"""llama_moe.training."""
