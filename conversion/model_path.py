"""Where a model is: the one rule for every command's model argument (a folder, a `.gguf` file or a Hub id).

Upcycling, verification, training, evaluation and analysis all call `locate_model` first, so a wrong path gets the
same clear error everywhere, before anything is loaded, and `from_pretrained_arguments` says how transformers opens
it (a GGUF file is read from its folder with `gguf_file=`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_id(value: str) -> bool:
    """Shaped like `org/name` and not a relative or absolute path."""
    return _HUB_ID.fullmatch(value) is not None and not value.startswith((".", "/", "~"))


@dataclass(frozen=True)
class ModelLocation:
    kind: str  # "folder", "gguf" or "hub"
    path: str

    def from_pretrained_arguments(self) -> tuple[str, dict]:
        """(name_or_path, extra keyword arguments) for transformers' `from_pretrained`."""
        if self.kind == "gguf":
            return os.path.dirname(os.path.abspath(self.path)), {"gguf_file": os.path.basename(self.path)}
        return self.path, {}


def locate_model(value: str | os.PathLike) -> ModelLocation:
    """A folder with config.json, an existing .gguf file, or something shaped like a Hub id; else one
    FileNotFoundError that says which."""
    value = os.fspath(value)
    if value.endswith(".gguf"):
        if not os.path.isfile(value):
            raise FileNotFoundError(f"GGUF file {value} does not exist.")
        return ModelLocation("gguf", value)
    if os.path.isdir(value):
        if not os.path.isfile(os.path.join(value, "config.json")):
            raise FileNotFoundError(
                f"{value} has no config.json: give a Hugging Face model folder, a .gguf file or a Hub id (org/name)."
            )
        return ModelLocation("folder", value)
    if os.path.exists(value):
        raise FileNotFoundError(
            f"{value} is not a model: give a model folder (with config.json), a .gguf file or a Hub id (org/name)."
        )
    if not is_hub_id(value):
        raise FileNotFoundError(
            f"model {value} does not exist: not found as a model folder or .gguf file, and not a Hub id (org/name)."
        )
    return ModelLocation("hub", value)
