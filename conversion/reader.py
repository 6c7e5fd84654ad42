"""Streaming access to a dense Llama checkpoint: a local safetensors folder, a `.gguf` file, a Hub id or a model.

Everything is validated when opened (architecture, config, files, shard headers, expected tensors) so that bad
input fails before any output exists; tensors are then read one at a time. Must not build MoE weights; the one
thing it writes is a dense source as a plain float32 folder (`write_dense_checkpoint`, which a run that loads a
.gguf base several times converts once).
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .atomic import atomic_output_dir
from .model_path import locate_model
from .writer import INDEX_FILE, SAFETENSORS_DTYPES

LLAMA_ARCHITECTURE = "LlamaForCausalLM"
# Files copied unchanged from a source checkpoint next to the weights written from it (upcycle, export, import).
SIDE_FILE_PATTERNS = (
    r"tokenizer.*",
    r"special_tokens_map\.json",
    r"added_tokens\.json",
    r"vocab\.(json|txt)",
    r"merges\.txt",
    r"chat_template\.(jinja|json)",
    r"generation_config\.json",
)
# Buffers some old checkpoints saved (RoPE's inverse frequencies); the model recomputes them at load.
IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def is_recomputed_buffer(name: str) -> bool:
    return IGNORED_KEYS.search(name) is not None


def copy_side_files(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy tokenizer and generation-config files (see SIDE_FILE_PATTERNS). Returns the copied names."""
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        if path.is_file() and any(re.fullmatch(pattern, path.name) for pattern in SIDE_FILE_PATTERNS):
            shutil.copy2(path, Path(out_dir) / path.name)
            copied.append(path.name)
    return copied


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoint files: the one reader every command uses (upcycle, export, LLaMA-MoE v1 import, push's card).
# ----------------------------------------------------------------------------------------------------------------

SAFETENSORS_TO_TORCH = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


def safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """A safetensors file's header (with its `__metadata__`) and where its tensor data starts; no data is read."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if not 0 < header_size <= os.path.getsize(path) - 8:
                raise ValueError(f"header size {header_size} does not fit the file")
            header = json.loads(f.read(header_size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a mapping")
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read {path}: {error}. The file is corrupt or not safetensors.") from error
    return header, 8 + header_size


class SafetensorsFile:
    """One safetensors file read with plain positioned reads instead of a memory map: a tensor's bytes go into a
    fresh buffer, so resident memory holds the tensors in use, not every page of the file touched so far."""

    def __init__(self, path: Path):
        self.path = path
        header, self.data_start = safetensors_header(path)
        header.pop("__metadata__", None)
        self.entries = header
        data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        if os.path.getsize(path) < self.data_start + data_end:
            raise ValueError(f"{path} is truncated (shorter than its header says); download or copy it again.")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self.entries[name]
        if entry["dtype"] not in SAFETENSORS_TO_TORCH:
            raise ValueError(
                f"{self.path}: tensor {name!r} has dtype {entry['dtype']}; supported: {sorted(SAFETENSORS_TO_TORCH)}."
            )
        return tuple(entry["shape"]), SAFETENSORS_TO_TORCH[entry["dtype"]]

    def get_tensor(self, name: str) -> torch.Tensor:
        shape, dtype = self.shape_and_dtype(name)
        start, end = self.entries[name]["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(buffer.numpy()) != end - start:
                raise ValueError(f"{self.path} ended inside tensor {name!r}: the file is truncated.")
        return buffer.view(dtype).reshape(shape)


class CheckpointReader:
    """Lazy access to the tensors of a Hugging Face checkpoint folder (model.safetensors, or shards with their
    index); `get` reads one tensor. Pickled `pytorch_model*.bin` weights are read (with `weights_only=True`) only
    with `allow_pickle=True`, which only the LLaMA-MoE v1 import passes: v1 was released as .bin files."""

    def __init__(self, src_dir: str | os.PathLike, allow_pickle: bool = False):
        self.src_dir = Path(src_dir)
        if not self.src_dir.is_dir():
            raise FileNotFoundError(f"Checkpoint directory {str(self.src_dir)!r} does not exist.")
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, SafetensorsFile] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        index = self.src_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.src_dir / file for name, file in weight_map.items()}
            missing = sorted({str(p.name) for p in self._file_of.values() if not p.is_file()})
            if missing:
                raise FileNotFoundError(f"{self.src_dir} lacks shard file(s) {missing} listed in its index.")
            for file in sorted(set(self._file_of.values())):
                present = set(self._keys_of(file))
                absent = [n for n, f in self._file_of.items() if f == file and n not in present]
                if absent:
                    raise ValueError(
                        f"the index says {absent[:3]} are in {file}, but they are not; the shard is corrupt."
                    )
            return
        single = self.src_dir / "model.safetensors"
        files = [single] if single.is_file() else sorted(self.src_dir.glob("*.safetensors"))
        bin_files = sorted(self.src_dir.glob("pytorch_model*.bin"))
        if not files and bin_files and not allow_pickle:
            raise ValueError(
                f"{self.src_dir} holds only pickle (.bin) weights, which llama-moe does not load (unsafe); convert "
                "them to safetensors first (load with transformers and save_pretrained)."
            )
        if not files and not bin_files:
            raise FileNotFoundError(
                f"{self.src_dir} has no model.safetensors or sharded *.safetensors with {INDEX_FILE}"
                + (" or pytorch_model*.bin: no weights." if allow_pickle else ": no weights.")
            )
        for file in files or bin_files:
            for name in self._keys_of(file):
                self._file_of[name] = file

    def _keys_of(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            return list(self._handle(file).keys())
        return list(self._bin(file).keys())

    def _handle(self, file: Path) -> SafetensorsFile:
        if file not in self._handles:
            self._handles[file] = SafetensorsFile(file)
        return self._handles[file]

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bin_cache:
            # mmap keeps the file on disk: tensors are paged in when `get` touches them.
            self._bin_cache[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return self._bin_cache[file]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of[name]
        if file.suffix == ".safetensors":
            return self._handle(file).get_tensor(name)
        return self._bin(file)[name]

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """From the file header: no tensor data is read."""
        file = self._file_of[name]
        if file.suffix == ".safetensors":
            return self._handle(file).shape_and_dtype(name)
        tensor = self._bin(file)[name]  # memory-mapped
        return tuple(tensor.shape), tensor.dtype


CONFIG_KEYS_TO_DROP = (
    "architectures",
    "model_type",
    "transformers_version",
    "auto_map",
    "quantization_config",
    "_name_or_path",
    "torch_dtype",
)


def check_llama_config(config_dict: dict, where: str) -> None:
    """Refuse anything that is not a dense Llama (SwiGLU, no MLP bias)."""
    architectures = config_dict.get("architectures") or []
    model_type = config_dict.get("model_type")
    if model_type == "llama_moe" or "LlamaMoEForCausalLM" in architectures:
        raise ValueError(f"{where} is already a llama_moe MoE checkpoint; upcycling needs a dense Llama model.")
    if model_type != "llama" and LLAMA_ARCHITECTURE not in architectures:
        found = ", ".join(architectures) or f"model_type {model_type!r}"
        raise ValueError(
            f"{where} is a {found} checkpoint; upcycling supports {LLAMA_ARCHITECTURE} (model_type 'llama': "
            f"Llama 2/3, SmolLM2, TinyLlama, ...) only."
        )
    if config_dict.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where} uses hidden_act {config_dict['hidden_act']!r}; the experts are SwiGLU (silu) only.")
    if config_dict.get("mlp_bias"):
        raise ValueError(
            f"{where} has mlp_bias=True; the MoE experts have no biases, so it cannot be upcycled exactly."
        )


def dense_config_from_dict(config_dict: dict) -> LlamaConfig:
    clean = {k: v for k, v in config_dict.items() if k not in CONFIG_KEYS_TO_DROP}
    return LlamaConfig(**clean)


def layer_of(name: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def expected_dense_keys(config: LlamaConfig) -> list[str]:
    """The tensors a dense Llama checkpoint must contain (lm_head only when embeddings are untied)."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        keys.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        keys += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    return keys


class DenseSource:
    """A dense checkpoint opened for streaming. Subclasses provide `_names`, `_load`, `_shape`, `save_tokenizer`."""

    name: str  # how the card names the base model
    config: LlamaConfig

    def keys(self) -> list[str]:
        """Tensor names without ignored buffers, in streaming order: embeddings, layer by layer, then the rest."""
        names = [n for n in self._names() if not is_recomputed_buffer(n)]

        def order(n):
            layer = layer_of(n)
            if n.startswith("model.embed_tokens"):
                return (-1, n)
            return (layer if layer is not None else 1 << 30, n)

        return sorted(names, key=order)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shape(name))

    def get(self, name: str) -> torch.Tensor:
        return self._load(name)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype("model.embed_tokens.weight")

    def check_complete(self) -> None:
        present = set(self._names())
        missing = [k for k in expected_dense_keys(self.config) if k not in present]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"{self.name} lacks tensors {missing[:5]}{more}: the checkpoint is incomplete.")

    def save_tokenizer(self, folder: str) -> list[str]:
        return []

    def load_tokenizer(self):
        """The base model's tokenizer, or None when the checkpoint has none."""
        return None

    def dense_model(self):
        """The whole dense LlamaForCausalLM in float32 (for methods that need calibration forward passes)."""
        with torch.device("meta"):
            model = LlamaForCausalLM(self.config)
        state = {name: self.get(name).float() for name in self.keys()}
        model.load_state_dict(state, strict=False, assign=True)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=self.config)
        model.tie_weights()
        return model.eval()

    def close(self) -> None:
        pass


class SafetensorsSource(DenseSource):
    """A local Hugging Face folder with model.safetensors or a sharded model.safetensors.index.json."""

    def __init__(self, folder: str, name: str | None = None):
        self.folder = folder
        self.name = name or folder
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{folder} has no config.json: is it a Hugging Face model folder?")
        with open(config_path) as f:
            config_dict = json.load(f)
        check_llama_config(config_dict, self.name)
        self.config = dense_config_from_dict(config_dict)
        self._reader = CheckpointReader(folder)  # validates index, shard headers and sizes now
        self.check_complete()

    def _names(self):
        return self._reader.keys()

    def _load(self, name):
        return self._reader.get(name)

    def _shape(self, name):
        return self._reader.shape_and_dtype(name)[0]

    def _dtype(self, name):
        return self._reader.shape_and_dtype(name)[1]

    def load_tokenizer(self):
        try:
            return AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError):
            return None

    def save_tokenizer(self, folder: str) -> list[str]:
        return copy_side_files(self.folder, folder)


class ModelSource(DenseSource):
    """An in-memory dense model (or its state dict), e.g. a GGUF file dequantized by transformers."""

    def __init__(self, model, name: str, tokenizer_loader=None):
        config_dict = model.config.to_dict()
        check_llama_config(config_dict, name)
        self.name = name
        self.config = dense_config_from_dict(config_dict)
        self._state = {k: v.detach() for k, v in model.state_dict().items()}
        self._model = model
        self._generation_config = getattr(model, "generation_config", None)
        self._tokenizer_loader, self._tokenizer = tokenizer_loader, None
        self.check_complete()

    def _names(self):
        return list(self._state)

    def _load(self, name):
        return self._state[name]

    def _shape(self, name):
        return self._state[name].shape

    def _dtype(self, name):
        return self._state[name].dtype

    def save_tokenizer(self, folder: str) -> list[str]:
        saved = []
        tokenizer = self.load_tokenizer()
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
            saved.append("tokenizer")
        if self._generation_config is not None:
            self._generation_config.save_pretrained(folder)
            saved.append("generation_config.json")
        return saved

    def load_tokenizer(self):
        # Loaded once: upcycling asks for it twice (calibration and the output folder), and from a GGUF file each
        # load parses its metadata again (6 s for SmolLM2).
        if self._tokenizer is None and self._tokenizer_loader is not None:
            self._tokenizer = self._tokenizer_loader()
        return self._tokenizer

    def dense_model(self):
        if all(p.dtype == torch.float32 for p in self._model.parameters()):
            return self._model  # used as is (no copy, no mode change)
        return super().dense_model()


def write_dense_checkpoint(source, out: str, overwrite: bool = False) -> str:
    """A dense source (DenseSource) as a float32 Hugging Face folder: config, safetensors
    weights, tokenizer and generation config, written atomically. Reading a .gguf dequantizes it and parses its
    metadata again at every load (about 30 s for SmolLM2-135M on 2 cores, config and tokenizer included); a run
    that loads the same base several times converts it once this way."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        # The base class's copy: a model dequantized from GGUF keeps a quantizer that save_pretrained refuses.
        model = DenseSource.dense_model(source)
        model.save_pretrained(tmp)
        source.save_tokenizer(tmp)
    return os.path.abspath(out)


def open_gguf(path: str) -> ModelSource:
    """Dequantize a .gguf file through transformers (float32) and read its state dict."""
    folder, fname = os.path.split(os.path.abspath(path))
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError("reading .gguf files needs the gguf package: pip install gguf") from None
    # transformers refuses GGUF architectures it cannot map; ModelSource then checks that the result is a Llama.
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot load {path} as a GGUF model through transformers: {error}") from None

    def load_tokenizer():
        return AutoTokenizer.from_pretrained(folder, gguf_file=fname)

    return ModelSource(model, name=fname, tokenizer_loader=load_tokenizer)


def download_hub(repo_id: str) -> str:
    """Snapshot of a Hub model (weights as safetensors, config, tokenizer); clear message when offline."""
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=is_offline_mode())
    except LocalEntryNotFoundError:
        raise ValueError(
            f"{repo_id!r} is not a local path and cannot be downloaded: the Hugging Face Hub is offline "
            "(HF_HUB_OFFLINE=1 or no network) and it is not in the local cache. Download it first "
            f"(huggingface-cli download {repo_id}) or pass a local folder or .gguf file."
        ) from None
    except Exception as error:
        raise ValueError(f"cannot download {repo_id!r} from the Hugging Face Hub: {error}") from None


def open_dense(base) -> DenseSource:
    """A local folder, a .gguf file, a Hub id, or an in-memory LlamaForCausalLM."""
    if not isinstance(base, (str, os.PathLike)):
        if hasattr(base, "state_dict") and hasattr(base, "config"):
            name_or_path = getattr(base.config, "_name_or_path", "") or ""

            def load_tokenizer():
                if not os.path.isdir(name_or_path):
                    return None

                try:
                    return AutoTokenizer.from_pretrained(name_or_path)
                except (OSError, ValueError):
                    return None

            return ModelSource(base, name=name_or_path or type(base).__name__, tokenizer_loader=load_tokenizer)
        raise ValueError(f"cannot upcycle a {type(base).__name__}: pass a path, a Hub id or a LlamaForCausalLM.")
    location = locate_model(base)
    if location.kind == "folder":
        return SafetensorsSource(location.path)
    if location.kind == "gguf":
        return open_gguf(location.path)
    return SafetensorsSource(download_hub(location.path), name=location.path)
