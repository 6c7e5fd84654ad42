"""Atomic, streaming, sharded safetensors output.

Shards are planned from tensor shapes before any weight exists; each shard's header is written first and tensor
bytes are then appended as they are produced, so memory stays at one tensor, never one shard. Output is built in
`OUT.tmp-<random>` beside OUT and renamed at the end (conversion/atomic.py). Must not decide what the tensors contain.
"""

import json
import math
import os
import re

import torch
from safetensors import safe_open

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def parse_size(size) -> int:
    """'5GB', '500MB', '2GiB', or a number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"--max-shard-size {size!r} is not a size; use e.g. 5GB, 500MB or a byte count.")
    number, unit = float(match.group(1)), (match.group(2) or "B")
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if "I" in unit else 1000
    value = int(number * base**power)
    if value <= 0:
        raise ValueError(f"--max-shard-size must be > 0, got {size!r}.")
    return value


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(specs: list[tuple[str, tuple, torch.dtype]], max_shard_size: int) -> list[list[int]]:
    """Split the ordered tensor list into consecutive shards of at most max_shard_size bytes (a bigger tensor
    gets a shard of its own), as transformers' save_pretrained does."""
    shards, current, current_size = [], [], 0
    for i, (_, shape, dtype) in enumerate(specs):
        size = tensor_bytes(shape, dtype)
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(i)
        current_size += size
    if current:
        shards.append(current)
    return shards


class ShardedSafetensorsWriter:
    """Write tensors in the planned order; `write` may receive a broadcast view (copied expert by expert)."""

    def __init__(self, folder: str, specs: list[tuple[str, tuple, torch.dtype]], max_shard_size: int):
        self.folder = folder
        self.specs = specs
        self.shards = plan_shards(specs, max_shard_size)
        n = len(self.shards)
        self.file_names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._position = 0  # index into specs of the next tensor
        self._shard = -1
        self._file = None
        self._shard_end = 0
        self.bytes_written = 0

    def _open_next_shard(self):
        if self._file is not None:
            self._file.close()
        self._shard += 1
        header, offset = {}, 0
        for i in self.shards[self._shard]:
            name, shape, dtype = self.specs[i]
            size = tensor_bytes(shape, dtype)
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header["__metadata__"] = {"format": "pt"}
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)
        self._file = open(os.path.join(self.folder, self.file_names[self._shard]), "wb")
        self._file.write(len(header_bytes).to_bytes(8, "little"))
        self._file.write(header_bytes)
        self._shard_end = self.shards[self._shard][-1]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._position >= len(self.specs):
            raise RuntimeError(f"writer got an unplanned tensor {name}")
        expected_name, shape, dtype = self.specs[self._position]
        if name != expected_name or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(
                f"writer expected {expected_name} {tuple(shape)} but got {name} {tuple(tensor.shape)} (plan mismatch)"
            )
        if self._file is None or self._position > self._shard_end:
            self._open_next_shard()
        rows = tensor.unsqueeze(0) if tensor.dim() == 0 else tensor
        if rows.dim() >= 3 and rows.stride(0) == 0:
            # A broadcast copy (every expert the same): cast one expert once, write it E times.
            data = memoryview(rows[0].to(dtype).contiguous().view(torch.uint8).numpy())
            for _ in range(rows.shape[0]):
                self._file.write(data)
        else:
            # Expert by expert for 3-D tensors, so a cast never materializes a whole [E, ...] tensor.
            for block in rows.split(1 if rows.dim() >= 3 else max(1, rows.shape[0]), dim=0):
                self._file.write(memoryview(block.to(dtype).contiguous().view(torch.uint8).numpy()))
        self.bytes_written += tensor_bytes(shape, dtype)
        self._position += 1

    def close(self) -> dict:
        """Finish the last shard and write the index (sharded output only). Returns the weight map."""
        if self._position != len(self.specs):
            missing = [s[0] for s in self.specs[self._position :]]
            raise RuntimeError(f"writer closed before {missing[:3]} were written")
        if self._file is not None:
            self._file.close()
            self._file = None
        weight_map = {self.specs[i][0]: self.file_names[s] for s, shard in enumerate(self.shards) for i in shard}
        if len(self.file_names) > 1:
            with open(os.path.join(self.folder, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}, f, indent=2)
        return weight_map

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_written_shapes(folder: str) -> dict[str, tuple]:
    """Tensor name -> shape, read back from the headers of the written shards."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [SINGLE_FILE]
    shapes = {}
    for fname in files:
        with safe_open(os.path.join(folder, fname), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes
