"""Loads a model and its tokenizer for analysis: a model directory, a Hub id, or a `.gguf` file.

Always through transformers' Auto classes with trust_remote_code (our checkpoints carry their code); it
checks paths before loading and never converts or writes anything.
"""

import os
from pathlib import Path


def check_model_path(path: str) -> None:
    """A .gguf file that exists, a folder with config.json, or something shaped like a Hub id (org/name); else one
    clear error, before anything is loaded or built."""
    path = str(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: give a Hugging Face model directory, Hub id or .gguf.")
    elif not os.path.exists(path) and (path.startswith((".", "/")) or path.count("/") != 1):
        raise FileNotFoundError(f"Model {path} not found: give a model directory, a Hub id (org/name) or a .gguf file.")


def load_model_and_tokenizer(path: str, device: str = "cpu", dtype: str = "auto"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(path)
    options = {"trust_remote_code": True}
    folder = path
    if str(path).endswith(".gguf"):
        folder, options["gguf_file"] = str(Path(path).parent), Path(path).name
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **options).to(device)
    model.eval()
    return model, tokenizer
