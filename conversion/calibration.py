"""Calibration for upcycling: the calibration text, and the dense model streamed layer by layer over it.

The text is a mixture of sources with an equal share of tokens each: the embedded corpus, text the dense model
samples itself (generated_text.py), the user's files. The default mixes the first two, so a model carved with no
data of the user's is not carved for one kind of text only.

`LayerwiseCalibration` holds the calibration tokens' hidden states and one decoder layer's attention at a time
(memory ~ 3 x tokens x hidden + one layer), so activation-aware methods and fitted routers work on models that do
not fit in memory. Each MoE layer is fitted on the inputs the upcycled model will really give it: the hidden
states go on through the layers already built, not the dense ones. Must not choose experts or routers.
"""

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .generated_text import sample_texts
from .stdlib_corpus import training_documents

SEQUENCE_LENGTH = 256
logger = logging.getLogger(__name__)


# Calibration sources by name besides files: the embedded corpus, and text the dense model samples itself.
BUILTIN_SOURCES = {
    "corpus": "the embedded corpus: training split of the Python standard library's sources and docs",
    "generated": "text sampled from the dense model itself (temperature 1, from its start token)",
}
DEFAULT_SOURCES = ("corpus", "generated")


@dataclass(frozen=True)
class CalibrationSource:
    """One part of the calibration mixture: a built-in source (path None) or a text/JSONL file."""

    name: str
    path: str | None = None

    def describe(self) -> str:
        """For the model card: the source's name, and a file's name and content hash (never a local path)."""
        if self.path is None:
            return f"{self.name} ({BUILTIN_SOURCES[self.name]})"
        file = Path(self.path)
        label = file.name if self.name == file.stem else f"{self.name}={file.name}"
        return f"{label} (sha256 {hashlib.sha256(file.read_bytes()).hexdigest()[:16]})"


def parse_calibration_sources(specs) -> list[CalibrationSource]:
    """`--calibration-data` values: built-in names (corpus, generated), FILE or NAME=FILE; None gives the defaults.
    Checks names and files before any work: a name given twice, a missing or empty file."""
    if specs is None:
        specs = DEFAULT_SOURCES
    elif isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    sources = []
    for spec in map(str, specs):
        if spec in BUILTIN_SOURCES:
            sources.append(CalibrationSource(spec))
            continue
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise ValueError(
                f"--calibration-data {spec!r}: give a file, NAME=FILE, or one of {sorted(BUILTIN_SOURCES)}."
            )
        check_calibration_file(path)
        sources.append(CalibrationSource(name, path))
    if not sources:
        raise ValueError(f"--calibration-data is empty: give a file, NAME=FILE, or {sorted(BUILTIN_SOURCES)}.")
    names = [source.name for source in sources]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(
            f"--calibration-data names {twice} more than once; give each source once (NAME=FILE renames a file)."
        )
    return sources


def read_calibration_text(path: str) -> str:
    """A plain-text file, or JSONL with a "text" field (or the first string field) per line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--calibration-data {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        if not path.endswith((".jsonl", ".json")):
            return f.read()
        texts = []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"--calibration-data {path} line {number} is not JSON.") from None
            text = record.get("text") if isinstance(record, dict) else None
            if text is None and isinstance(record, dict):
                text = next((v for v in record.values() if isinstance(v, str)), None)
            if text:
                texts.append(text)
        return "\n\n".join(texts)


def check_calibration_file(path: str) -> None:
    """Before any work: the file exists and holds text."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--calibration-data {path} does not exist.")
    if not read_calibration_text(path).strip():
        raise ValueError(f"--calibration-data {path} holds no text.")


def corpus_text(max_chars: int) -> str:
    """About the first `max_chars` of the embedded corpus's training documents, code and docs alternating."""

    parts, size = [], 0
    for text in training_documents():
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n\n".join(parts)


def source_text(source: CalibrationSource, tokens: int, dense, tokenizer, seed: int) -> str:
    """Enough text of one source for `tokens` tokens (a file gives what it has)."""
    if source.name == "corpus" and source.path is None:
        return corpus_text(tokens * 8)
    if source.name == "generated" and source.path is None:
        return "\n\n".join(sample_texts(dense.dense_model(), tokenizer, tokens, seed=seed))
    return read_calibration_text(source.path)[: tokens * 16]


def calibration_blocks(
    tokenizer, text: str, max_tokens: int, sequence_length: int = SEQUENCE_LENGTH, what: str = "--calibration-data"
) -> torch.Tensor:
    """[blocks, sequence_length] token ids: at most `max_tokens` of `text`, cut into whole blocks."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:max_tokens]
    usable = ids.shape[0] // sequence_length * sequence_length
    if usable == 0:
        raise ValueError(f"{what} gives {ids.shape[0]} tokens; calibration needs at least {sequence_length}.")
    return ids[:usable].view(-1, sequence_length)


def mixture_blocks(
    sources: list[CalibrationSource], tokens: int, dense, tokenizer, seed: int, sequence_length: int = SEQUENCE_LENGTH
) -> torch.Tensor:
    """[blocks, sequence_length]: an equal share of `tokens` from each source, in whole blocks."""
    share = tokens // len(sources)
    if share < sequence_length:
        raise ValueError(
            f"--calibration-tokens {tokens} over {len(sources)} sources gives each {share} tokens; each needs at "
            f"least {sequence_length}: raise --calibration-tokens or give fewer sources."
        )
    parts = []
    for source in sources:
        blocks = calibration_blocks(
            tokenizer,
            source_text(source, share, dense, tokenizer, seed),
            share,
            sequence_length,
            what=f"--calibration-data source {source.name!r}",
        )
        if blocks.numel() < share // sequence_length * sequence_length:
            logger.warning(
                "calibration source %r gives %d tokens of its share of %d", source.name, blocks.numel(), share
            )
        parts.append(blocks)
    return torch.cat(parts)


class LayerwiseCalibration:
    """The dense model run one decoder layer at a time over calibration blocks, read tensor by tensor from a
    DenseSource. Per MoE layer: `ffn_inputs(layer)` runs everything up to that layer's FFN and returns its input
    [tokens, hidden]; `finish(layer, ffn)` applies the FFN that was built (any callable) and moves on. Layers
    that stay dense run with their own FFN."""

    def __init__(self, source, blocks_NS: torch.Tensor, batch_size: int = 8):
        self.source, self.batch_size = source, batch_size
        self.config = copy.deepcopy(source.config)
        self.config._attn_implementation = "sdpa"  # causal without a mask (every block is full length)
        embeddings = source.get("model.embed_tokens.weight")
        self.hidden_NSH = embeddings[blocks_NS].float()
        positions = torch.arange(blocks_NS.shape[1])[None]
        self.position_embeddings = LlamaRotaryEmbedding(config=self.config)(self.hidden_NSH[:1], positions)
        self.next_layer = 0
        self._residual = self._inputs = None

    def _module(self, module_class, prefix: str, *args):
        with torch.device("meta"):
            module = module_class(*args)
        state = {name: self.source.get(prefix + name).float() for name in module.state_dict()}
        module.load_state_dict(state, assign=True)
        return module.eval()

    def _batches(self, tensor):
        return tensor.split(self.batch_size)

    @torch.no_grad()
    def _attention(self, layer: int) -> None:
        prefix = f"model.layers.{layer}."
        H, eps = self.config.hidden_size, self.config.rms_norm_eps
        input_norm = self._module(LlamaRMSNorm, prefix + "input_layernorm.", H, eps)
        attention = self._module(LlamaAttention, prefix + "self_attn.", self.config, layer)
        post_norm = self._module(LlamaRMSNorm, prefix + "post_attention_layernorm.", H, eps)
        cos, sin = self.position_embeddings
        residual = []
        for hidden in self._batches(self.hidden_NSH):
            out, _ = attention(
                hidden_states=input_norm(hidden),
                attention_mask=None,
                position_embeddings=(cos.expand(len(hidden), -1, -1), sin.expand(len(hidden), -1, -1)),
            )
            residual.append(hidden + out)
        self._residual = torch.cat(residual)
        self._inputs = torch.cat([post_norm(r) for r in self._batches(self._residual)])

    @torch.no_grad()
    def _apply_ffn(self, ffn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.hidden_NSH = torch.cat(
            [r + ffn(x) for r, x in zip(self._batches(self._residual), self._batches(self._inputs))]
        )
        self._residual = self._inputs = None
        self.next_layer += 1

    def _dense_layer(self, layer: int) -> None:
        self._attention(layer)
        self._apply_ffn(self._module(LlamaMLP, f"model.layers.{layer}.mlp.", self.config))

    def ffn_inputs(self, layer: int) -> torch.Tensor:
        """The FFN input of `layer` for every calibration token, [tokens, hidden] float32."""
        if layer < self.next_layer or (layer == self.next_layer and self._inputs is not None):
            raise RuntimeError(f"calibration already passed layer {layer} (layers must be built in order)")
        while self.next_layer < layer:
            self._dense_layer(self.next_layer)
        self._attention(layer)
        return self._inputs.reshape(-1, self._inputs.shape[-1])

    def finish(self, layer: int, ffn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run `layer`'s calibration tokens through the FFN that replaces the dense one; go on to the next layer."""
        if layer != self.next_layer or self._inputs is None:
            raise RuntimeError(f"finish({layer}) without ffn_inputs({layer}) first")
        self._apply_ffn(ffn)
