"""Training domains: read local text / JSONL / Parquet / Hub datasets as a stream, tokenize, pack into blocks.

Streams and resumes by position (epoch, piece, token offset); it must not sample between domains (mixture.py does)
and must never load a whole corpus into memory.

Why not TRL's packing: `trl.pack_dataset(..., "wrapped")` works on a `datasets` table and keeps no position to
resume from, while a mixture whose weights change during training needs per-domain streams that can restart at an
exact block. We pack the same way as TRL's "wrapped" strategy (documents joined with EOS, cut into `max_length`
blocks, attention across document boundaries as in classic pre-training) and hand SFTTrainer tokenized blocks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq
from datasets import load_dataset, load_dataset_builder

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".tex")
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
CHUNK_CHARS = 1 << 16  # a plain text file is tokenized in pieces of about 64k characters, cut at line ends


@dataclass
class DomainSpec:
    name: str
    path: str
    text_field: str = "text"
    weight: float | None = None


@dataclass(frozen=True)
class StreamPosition:
    """Where a domain stream continues: `piece` (a document or a text chunk) and tokens of it already used."""

    epoch: int = 0
    piece: int = 0
    offset: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.piece, self.offset]

    @classmethod
    def from_list(cls, values) -> StreamPosition:
        return cls(*[int(v) for v in values])


def parse_domains(entries, text_field: str = "text") -> list[DomainSpec]:
    """`["code=/path", {"name": "prose", "path": "...", "weight": 0.3}]` -> DomainSpecs (names unique)."""
    specs = []
    for entry in entries or []:
        if isinstance(entry, dict):
            if "name" not in entry or "path" not in entry:
                raise ValueError(f"dataset entry {entry} needs 'name' and 'path' keys.")
            spec = DomainSpec(
                str(entry["name"]), str(entry["path"]), str(entry.get("text_field", text_field)), entry.get("weight")
            )
        else:
            if "=" not in str(entry):
                raise ValueError(f"--dataset {entry!r} is not NAME=PATH (example: --dataset code=/data/code.jsonl).")
            name, path = str(entry).split("=", 1)
            spec = DomainSpec(name.strip(), os.path.expanduser(path.strip()), text_field)
        if not spec.name:
            raise ValueError(f"--dataset {entry!r} has an empty domain name.")
        specs.append(spec)
    if not specs:
        raise ValueError(
            "no training data: give at least one --dataset NAME=PATH (or a `dataset:` list in the recipe)."
        )
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"domain names must be unique; repeated: {duplicates}.")
    return specs


def _is_hub_name(path: str) -> bool:
    return not os.path.exists(path) and not path.startswith((".", "/", "~")) and path.count("/") <= 1


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        found += [
            os.path.join(root, name)
            for name in sorted(names)
            if not name.startswith(".") and name.endswith(TEXT_SUFFIXES + TABLE_SUFFIXES)
        ]
    return found


def check_domain(spec: DomainSpec) -> None:
    """Fail early, with a message naming the domain, when its data cannot be read."""
    if os.path.exists(spec.path):
        if os.path.isdir(spec.path) and not _files(spec.path):
            raise ValueError(
                f"domain {spec.name!r}: folder {spec.path} holds no readable files "
                f"(looked for {', '.join(TEXT_SUFFIXES + TABLE_SUFFIXES)})."
            )
        return
    if not _is_hub_name(spec.path):
        raise FileNotFoundError(f"domain {spec.name!r}: {spec.path} does not exist.")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise FileNotFoundError(
            f"domain {spec.name!r}: {spec.path!r} is not a local file or folder, and Hub datasets cannot be read "
            "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set): download it first and pass its local path."
        )


def domain_size(spec: DomainSpec) -> float:
    """Size used by `--sampling proportional`: bytes on disk, or the Hub dataset's declared size."""
    if os.path.exists(spec.path):
        return float(sum(os.path.getsize(path) for path in _files(spec.path)))

    info = load_dataset_builder(spec.path).info
    size = info.dataset_size or info.size_in_bytes
    if not size:
        raise ValueError(
            f"domain {spec.name!r}: the Hub dataset declares no size, so --sampling proportional cannot weigh it; "
            "use --sampling static with --dataset_weights."
        )
    return float(size)


def _text_file_pieces(path: str) -> Iterator[tuple[str, bool]]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        chunk, size = [], 0
        for line in handle:
            chunk.append(line)
            size += len(line)
            if size >= CHUNK_CHARS:
                yield "".join(chunk), False
                chunk, size = [], 0
        yield "".join(chunk), True


def _jsonl_pieces(path: str, field: str) -> Iterator[tuple[str, bool]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise ValueError(f"{path}:{number} has no field {field!r} (set --dataset_text_field).")
            yield str(record[field]), True


def _parquet_pieces(path: str, field: str) -> Iterator[tuple[str, bool]]:
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise ValueError(
            f"{path} has no column {field!r} (set --dataset_text_field); columns: {table.schema_arrow.names}."
        )
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield str(text), True


def _hub_pieces(spec: DomainSpec) -> Iterator[tuple[str, bool]]:
    for record in load_dataset(spec.path, split="train", streaming=True):
        yield str(record[spec.text_field]), True


def iter_pieces(spec: DomainSpec) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) for every piece of the domain, in a fixed order."""
    if not os.path.exists(spec.path):
        yield from _hub_pieces(spec)
        return
    for path in _files(spec.path):
        if path.endswith((".jsonl", ".json")):
            yield from _jsonl_pieces(path, spec.text_field)
        elif path.endswith(".parquet"):
            yield from _parquet_pieces(path, spec.text_field)
        else:
            yield from _text_file_pieces(path)


class DomainStream:
    """One domain as an endless stream of packed `block_size`-token blocks, each with the position after it.

    The first `validation_blocks` blocks are the held-out split; training epochs restart right after them.
    """

    def __init__(self, spec: DomainSpec, tokenizer, block_size: int, validation_blocks: int):
        self.spec, self.tokenizer, self.block_size = spec, tokenizer, block_size
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token, needed to join documents; set one on the tokenizer.")
        self.validation, self.train_start = [], StreamPosition()
        blocks = self._pass(StreamPosition())
        for block, position in blocks:
            self.validation.append(block)
            self.train_start = position
            if len(self.validation) == validation_blocks:
                break
        if len(self.validation) < validation_blocks or next(blocks, None) is None:
            raise ValueError(
                f"domain {spec.name!r} is too small: it needs {validation_blocks} held-out blocks plus at least one "
                f"training block of {block_size} tokens; add data or lower --validation_blocks / --max_length."
            )
        blocks.close()

    def _tokens(self, text: str, ends_document: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.eos_token_id] if ends_document else ids

    def _pass(self, start: StreamPosition) -> Iterator[tuple[list[int], StreamPosition]]:
        """Blocks of one pass over the data from `start`; the partial block at the end of the pass is dropped."""
        buffer: list[int] = []
        for piece, (text, ends_document) in enumerate(iter_pieces(self.spec)):
            if piece < start.piece:
                continue
            tokens = self._tokens(text, ends_document)
            if piece == start.piece:
                tokens = tokens[start.offset :]
                used = start.offset
            else:
                used = 0
            buffer += tokens
            while len(buffer) >= self.block_size:
                block, buffer = buffer[: self.block_size], buffer[self.block_size :]
                # What is left in the buffer is always the tail of this piece (see the invariant in the docs).
                yield block, StreamPosition(start.epoch, piece, used + len(tokens) - len(buffer))

    def blocks(self, position: StreamPosition | None = None) -> Iterator[tuple[list[int], StreamPosition]]:
        """Training blocks from `position` (default: the start of training), epoch after epoch, forever."""
        position = position or self.train_start
        while True:
            produced = False
            for block, after in self._pass(position):
                produced = True
                yield block, StreamPosition(position.epoch, after.piece, after.offset)
            if not produced and position == self.train_start:
                raise RuntimeError(f"domain {self.spec.name!r} yielded no training block")
            position = StreamPosition(position.epoch + 1, self.train_start.piece, self.train_start.offset)
