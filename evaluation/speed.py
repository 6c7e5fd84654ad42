"""What a model costs to run: total and active (per-token) parameter counts, and generation speed.

Speed is measured with `generate()` (greedy, batch 1, KV cache) so any causal LM compares fairly with its
dense base in the same run; it reports numbers and asserts nothing about them.
"""

import statistics
import time

import torch

from llama_moe.modeling.parameters import model_parameter_counts


def parameter_counts(model) -> dict:
    """Total, routed-expert and active-per-token parameters, by the project's one rule
    (llama_moe.modeling.parameters); works for LlamaMoE, Mixtral, Qwen2-MoE and dense models."""
    return model_parameter_counts(model)


def _timed_generate(model, input_ids, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():  # not inference_mode: tensors it creates cannot be reused outside it
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else None,
        )
    return time.perf_counter() - start


def generation_speed(model, prompt_ids: list[int], new_tokens: int = 32, repeats: int = 3) -> dict:
    """Prefill tokens/s (prompt length / time to the first new token) and decode tokens/s (further tokens /
    their time), medians over `repeats` after one warm-up, batch 1, greedy."""
    if len(prompt_ids) < 1 or new_tokens < 2:
        raise ValueError("Speed needs a prompt of >= 1 token and >= 2 new tokens.")
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    _timed_generate(model, input_ids, 2)  # warm-up
    prefill, full = [], []
    for _ in range(repeats):
        prefill.append(_timed_generate(model, input_ids, 1))
        full.append(_timed_generate(model, input_ids, new_tokens))
    prefill_s, full_s = statistics.median(prefill), statistics.median(full)
    decode_s = max(full_s - prefill_s, 1e-9)
    return {
        "prompt_tokens": len(prompt_ids),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "prefill_tokens_per_s": len(prompt_ids) / prefill_s,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
