"""llama_moe.evaluation."""
