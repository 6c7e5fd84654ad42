"""Text sampled from the dense model itself: calibration (and replay) data that covers what the model knows, with
no data of the user's (as data-free quantization-aware training, LLM-QAT, distills on the model's own samples).

Sequences start from the tokenizer's start token and are sampled at temperature 1 with a fixed seed, so the same
model and seed give the same text. Needs the whole dense model in memory. Must not read the user's data.
"""

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import atomic_write_text, refuse_existing_output
from .reader import open_dense

SAMPLE_BATCH = 32  # sequences decoded together: about 4x the tokens per second of one sequence on 2 CPU cores
SAMPLE_LENGTH = 256  # new tokens per sequence at most (a sequence also ends at the end-of-sequence token)


def start_token(model, tokenizer) -> int:
    """The token a document starts after: BOS, else EOS (of the tokenizer, else of the model's config)."""
    config = model.config
    for token in (tokenizer.bos_token_id, config.bos_token_id, tokenizer.eos_token_id, config.eos_token_id):
        if isinstance(token, int):
            return token
    raise ValueError("sampling text needs a start token, and neither the tokenizer nor the model names BOS or EOS.")


@torch.inference_mode()
def sample_texts(model, tokenizer, tokens: int, seed: int = 0, progress: bool = True) -> list[str]:
    """At least `tokens` tokens of text sampled from `model` (a causal LM), as a list of documents."""
    device = next(model.parameters()).device
    start = start_token(model, tokenizer)
    model_eos = model.generation_config.eos_token_id
    model_eos = model_eos if isinstance(model_eos, list) else [model_eos]
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id, start, *model_eos) if t is not None}
    documents, sampled = [], 0
    bar = tqdm(total=tokens, desc="sampling text from the dense model", unit="tok", disable=not progress)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        while sampled < tokens:
            batch = min(SAMPLE_BATCH, -(-(tokens - sampled) // SAMPLE_LENGTH))
            ids = torch.full((batch, 1), start, device=device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=SAMPLE_LENGTH,
                pad_token_id=start if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
            )
            for row in out[:, 1:].tolist():
                row = [token for token in row if token not in stops]
                if row:
                    documents.append(tokenizer.decode(row))
                    sampled += len(row)
                    bar.update(len(row))
    bar.close()
    return documents


def write_generated_text(base: str, out, tokens: int, seed: int = 0, overwrite: bool = False) -> Path:
    """OUT (JSONL, one "text" field per document): `tokens` tokens sampled from the dense model `base` (a folder,
    .gguf file or Hub id), for calibration (`--calibration-data generated=OUT`) or replay in training
    (`--dataset generated=OUT`)."""
    out = Path(out)
    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}.")
    refuse_existing_output(str(out), overwrite)
    source = open_dense(base)
    tokenizer = source.load_tokenizer()
    if tokenizer is None:
        raise ValueError(f"sampling text needs the base model's tokenizer, and {source.name} has none.")
    documents = sample_texts(source.dense_model(), tokenizer, tokens, seed=seed)
    atomic_write_text(out, "".join(json.dumps({"text": text}) + "\n" for text in documents))
    return out
