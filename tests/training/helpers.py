"""Run `llama-moe train` in-process for tests and read what it logged."""

import json
import os

from llama_moe.cli.main import main as cli_main


def train_args(model_dir, corpora, out, steps, **flags):
    args = [
        "--model_name_or_path",
        str(model_dir),
        "--dataset",
        f"code={corpora['code']}",
        "--dataset",
        f"docs={corpora['docs']}",
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        "--max_length",
        "64",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "0",
        "--logging_steps",
        "1",
        "--save_steps",
        str(steps),
        "--validation_blocks",
        "2",
        "--seed",
        "0",
        "--disable_tqdm",
        "true",
    ]
    for key, value in flags.items():
        args += [f"--{key}", str(value)]
    return args


def run_train(args) -> int:
    return cli_main(["train", *args])


def log_history(checkpoint) -> list[dict]:
    with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
        return json.load(handle)["log_history"]


def train_losses(history) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
