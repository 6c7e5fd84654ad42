"""What a model costs to run: total and active (per-token) parameter counts, and generation speed.

Speed is measured with `generate()` (greedy, batch 1, KV cache) so any causal LM compares fairly with its
dense base in the same run; it reports numbers and asserts nothing about them.
"""

import statistics
import time


def parameter_counts(model) -> dict:
    """Total parameters (shared tensors once), routed-expert parameters, and parameters active per token
    (everything but the routed experts, plus top_k/E of them). Works for LlamaMoE and fused-experts models
    such as Mixtral in transformers v5; a dense model has active == total."""
    config = model.config
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    seen, total, expert = set(), 0, 0
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if num_experts and ".experts." in f".{name}" and param.dim() == 3 and param.shape[0] == num_experts:
            expert += param.numel()
    embedding = model.get_input_embeddings().weight.numel() if model.get_input_embeddings() is not None else 0
    active = total - expert + (expert * top_k // num_experts if expert else 0)
    return {"total": total, "active": active, "routed_experts": expert, "embedding": embedding,
            "num_experts": num_experts, "top_k": top_k}


def _timed_generate(model, input_ids, new_tokens: int) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():  # not inference_mode: tensors it creates cannot be reused outside it
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                       pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else None)
    return time.perf_counter() - start


def generation_speed(model, prompt_ids: list[int], new_tokens: int = 32, repeats: int = 3) -> dict:
    """Prefill tokens/s (prompt length / time to the first new token) and decode tokens/s (further tokens /
    their time), medians over `repeats` after one warm-up, batch 1, greedy."""
    import torch

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
    return {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "repeats": repeats,
            "prefill_seconds": prefill_s, "decode_seconds": decode_s,
            "prefill_tokens_per_s": len(prompt_ids) / prefill_s, "decode_tokens_per_s": (new_tokens - 1) / decode_s,
            "threads": torch.get_num_threads(), "device": str(device)}
