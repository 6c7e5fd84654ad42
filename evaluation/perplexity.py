"""Per-domain perplexity of a causal LM over local text, with a hook for whatever else a forward pass yields.

Reads text (a file, a JSONL with a "text" field, or a folder of text files), tokenizes it into fixed-size
blocks and sums next-token negative log-likelihoods; it does not interpret router outputs (see routing.py).
"""

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl")


def read_domain_texts(path: str | Path) -> list[str]:
    """Documents of one domain: a text file (one document), a .jsonl file (its "text" field, one per line) or
    a folder (every text file inside, sorted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data path {path} does not exist.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"Folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)}).")
        return [text for file in files for text in read_domain_texts(file)]
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "text" not in row:
                    raise ValueError(f'{path} line {number} has no "text" field (fields: {sorted(row)}).')
                texts.append(row["text"])
        return texts
    return [path.read_text(encoding="utf-8", errors="replace")]


def token_blocks(tokenizer, texts: list[str], block_size: int, max_tokens: int) -> list[list[int]]:
    """Concatenate documents (EOS between them when the tokenizer has one) and cut into blocks of
    `block_size` tokens, keeping at most `max_tokens` tokens in total."""
    if block_size < 2:
        raise ValueError(f"block size must be >= 2 tokens, got {block_size}.")
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    return [block for block in blocks if len(block) >= 2]


def domain_perplexity(
    model,
    blocks: list[list[int]],
    on_outputs: Callable | None = None,
    forward_kwargs: dict | None = None,
    progress: str | None = None,
) -> dict:
    """Perplexity over the blocks (each block scored independently, every token but the first predicted).
    `on_outputs(outputs)` sees each forward's outputs (e.g. to collect router logits)."""
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():  # not inference_mode: tensors it creates cannot be reused outside it
        for block in tqdm(blocks, desc=progress, disable=progress is None, leave=False):
            input_ids = torch.tensor([block], device=device)
            outputs = model(input_ids=input_ids, **(forward_kwargs or {}))
            logits_TV = outputs.logits[0, :-1].float()
            nll = F.cross_entropy(logits_TV, input_ids[0, 1:], reduction="sum")
            total_nll += float(nll)
            total_tokens += input_ids.shape[1] - 1
            if on_outputs is not None:
                on_outputs(outputs)
    if total_tokens == 0:
        raise ValueError("No tokens to score: the domain's text is empty.")
    mean_nll = total_nll / total_tokens
    return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "tokens": total_tokens, "blocks": len(blocks)}
