"""Loads a model and its tokenizer for analysis: a model directory, a Hub id, or a `.gguf` file.

Always through transformers' Auto classes with trust_remote_code (our checkpoints carry their code); it
checks paths before loading and never converts or writes anything.
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_moe.conversion.model_path import locate_model


def check_model_path(path: str) -> None:
    """One clear error, before anything is loaded or built, unless `path` is a model (conversion/model_path.py)."""
    locate_model(path)


def load_model_and_tokenizer(path: str, device: str = "cpu", dtype: str = "auto"):
    folder, options = locate_model(path).from_pretrained_arguments()
    options["trust_remote_code"] = True
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **options).to(device)
    model.eval()
    return model, tokenizer
