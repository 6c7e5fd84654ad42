"""Streaming access to a dense Llama checkpoint: a local safetensors folder, a `.gguf` file, a Hub id or a model.

Everything is validated when opened (architecture, config, files, shard headers, expected tensors) so that bad
input fails before any output exists; tensors are then read one at a time. Must not build MoE weights or write.
"""

import json
import os
import re

import torch
from safetensors import safe_open
from transformers import LlamaConfig


LLAMA_ARCHITECTURE = "LlamaForCausalLM"
# Files copied from the base folder into the output (when present).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Buffers some old checkpoints saved; the model recomputes them.
IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
CONFIG_KEYS_TO_DROP = ("architectures", "model_type", "transformers_version", "auto_map", "quantization_config",
                       "_name_or_path", "torch_dtype")


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
        raise ValueError(f"{where} has mlp_bias=True; the MoE experts have no biases, so it cannot be upcycled exactly.")


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
        names = [n for n in self._names() if not IGNORED_KEYS.search(n)]

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
        from transformers import LlamaForCausalLM

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
        self._shard_of = self._weight_map()
        self._handles = {}
        self._unread = {}
        for shard in sorted(set(self._shard_of.values())):
            path = os.path.join(folder, shard)
            handle = open_safetensors(path)
            names = set(handle.keys())
            expected_size = _data_end(handle, names)
            if os.path.getsize(path) < expected_size:
                raise ValueError(f"{path} is truncated; download it again.")
            self._handles[shard] = handle
            listed = [n for n, s in self._shard_of.items() if s == shard]
            absent = [n for n in listed if n not in names]
            if absent:
                raise ValueError(f"the index says {absent[:3]} are in {path}, but they are not; the shard is corrupt.")
        self.check_complete()

    def _weight_map(self) -> dict[str, str]:
        index_path = os.path.join(self.folder, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            missing = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(self.folder, s))})
            if missing:
                raise FileNotFoundError(f"{self.folder} lacks shard file(s) {missing} listed in its index.")
            return weight_map
        single = os.path.join(self.folder, "model.safetensors")
        if os.path.isfile(single):
            return {n: "model.safetensors" for n in open_safetensors(single).keys()}
        if any(f.endswith(".bin") for f in os.listdir(self.folder)):
            raise ValueError(
                f"{self.folder} holds only pickle (.bin) weights, which llama-moe does not load (unsafe); convert "
                "them to safetensors first (load with transformers and save_pretrained)."
            )
        raise FileNotFoundError(f"{self.folder} has no model.safetensors or model.safetensors.index.json.")

    def _names(self):
        return list(self._shard_of)

    def _handle(self, shard):
        if shard not in self._handles:
            self._handles[shard] = open_safetensors(os.path.join(self.folder, shard))
        return self._handles[shard]

    def _load(self, name):
        shard = self._shard_of[name]
        tensor = self._handle(shard).get_tensor(name)
        # Unmap a shard once all its tensors were read: its pages would otherwise stay in resident memory.
        unread = self._unread.setdefault(
            shard, {n for n, s in self._shard_of.items() if s == shard and not IGNORED_KEYS.search(n)}
        )
        unread.discard(name)
        if not unread:
            self._handles.pop(shard, None)
        return tensor

    def _shape(self, name):
        return self._handle(self._shard_of[name]).get_slice(name).get_shape()

    def _dtype(self, name):
        dtype = self._handle(self._shard_of[name]).get_slice(name).get_dtype()
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)

    def close(self) -> None:
        self._handles.clear()

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError):
            return None

    def save_tokenizer(self, folder: str) -> list[str]:
        import shutil

        copied = []
        for fname in TOKENIZER_FILES:
            src = os.path.join(self.folder, fname)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(folder, fname))
                copied.append(fname)
        return copied


def open_safetensors(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # safetensors raises its own error type for a bad header
        raise ValueError(f"cannot read {path}: {error}; the file looks corrupt, download it again.") from None


def _data_end(handle, names) -> int:
    """Smallest file size that can hold every tensor the header lists (header size unknown: lower bound)."""
    total = 0
    for n in names:
        sl = handle.get_slice(n)
        numel = 1
        for d in sl.get_shape():
            numel *= d
        total += numel * _DTYPE_BYTES.get(sl.get_dtype(), 1)
    return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


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
        self._tokenizer_loader = tokenizer_loader
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
        return self._tokenizer_loader() if self._tokenizer_loader is not None else None

    def dense_model(self):
        if all(p.dtype == torch.float32 for p in self._model.parameters()):
            return self._model  # used as is (no copy, no mode change)
        return super().dense_model()


def open_gguf(path: str) -> ModelSource:
    """Dequantize a .gguf file through transformers (float32) and read its state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.constants import is_offline_mode

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
                from transformers import AutoTokenizer

                try:
                    return AutoTokenizer.from_pretrained(name_or_path)
                except (OSError, ValueError):
                    return None

            return ModelSource(base, name=name_or_path or type(base).__name__, tokenizer_loader=load_tokenizer)
        raise ValueError(f"cannot upcycle a {type(base).__name__}: pass a path, a Hub id or a LlamaForCausalLM.")
    base = os.fspath(base)
    if os.path.isdir(base):
        return SafetensorsSource(base)
    if base.endswith(".gguf"):
        if not os.path.isfile(base):
            raise FileNotFoundError(f"{base} does not exist.")
        return open_gguf(base)
    looks_like_repo = re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None and not base.startswith((".", "/"))
    if not looks_like_repo:
        raise FileNotFoundError(f"{base} does not exist (expected a model folder, a .gguf file or a Hub id).")
    return SafetensorsSource(download_hub(base), name=base)
