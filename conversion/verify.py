"""`--verify`: run the dense model and the upcycled checkpoint on the same real text and compare them.

Reports the largest absolute logit difference (0 up to float rounding for copy, granular exact mode and drop with
ratio 0) and both perplexities. Loads both models in float32: meant for models that fit in memory twice.
"""

import argparse
import copy
import json as json_module
import logging
import math
import os

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from .model_path import locate_model
from .reader import download_hub


def sample_text() -> str:
    """Real English prose available offline everywhere: docstrings of the Python standard library."""
    return "\n\n".join(m.__doc__.strip() for m in (json_module, argparse, logging) if m.__doc__)


def load_dense(base):
    if hasattr(base, "dense_model"):  # an opened DenseSource
        return base.dense_model()
    if not isinstance(base, (str, os.PathLike)):
        return base
    location = locate_model(base)
    if location.kind == "hub":
        return AutoModelForCausalLM.from_pretrained(download_hub(location.path), dtype=torch.float32)
    path, options = location.from_pretrained_arguments()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **options)


def token_ids(out: str, vocab_size: int, max_tokens: int) -> tuple[torch.Tensor, str]:
    text = sample_text()
    try:
        tokenizer = AutoTokenizer.from_pretrained(out)
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
        return ids, "tokenized standard-library docstrings"
    except (OSError, ValueError, TypeError):
        data = torch.tensor(list(text.encode()[:max_tokens])) % vocab_size
        return data[None], "bytes of standard-library docstrings (no tokenizer in the checkpoint)"


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return math.exp(loss.item())


@torch.no_grad()
def verify_upcycled(base, out: str, max_tokens: int = 128) -> dict:
    dense = load_dense(base)
    if any(p.dtype != torch.float32 for p in dense.parameters()):
        dense = copy.deepcopy(dense).float()  # never change the caller's model
    dense.eval()
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids, what = token_ids(out, dense.config.vocab_size, max_tokens)
    dense_logits = dense(ids).logits
    moe_logits = moe(ids).logits
    report = {
        "tokens": ids.shape[1],
        "text": what,
        "max_abs_logit_diff": (dense_logits - moe_logits).abs().max().item(),
        "dense_perplexity": perplexity(dense_logits, ids),
        "moe_perplexity": perplexity(moe_logits, ids),
    }
    report["summary"] = (
        f"verify on {report['tokens']} tokens ({what}): max |logit diff| {report['max_abs_logit_diff']:.3g}, "
        f"perplexity dense {report['dense_perplexity']:.3f} vs MoE {report['moe_perplexity']:.3f}"
    )
    return report
