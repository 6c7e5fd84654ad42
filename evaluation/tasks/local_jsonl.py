"""Loads a local task's JSONL data relative to this folder, so `--include_path` works from any directory.

Referenced from the task YAMLs as `custom_dataset: !function local_jsonl.load`; lm-eval passes it the
task's `dataset_kwargs` (and its metadata, ignored here). Must not download anything.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict, **_metadata) -> datasets.DatasetDict:
    resolved = {split: str(HERE / name) for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=resolved)
