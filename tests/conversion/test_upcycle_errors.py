"""Bad input is refused with a message naming the problem, before any output exists."""

import json
import os
import shutil

import pytest

from llama_moe.conversion import upcycle
from tests.conversion.dense_fixtures import write_dense


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return write_dense(tmp_path_factory.mktemp("dense") / "llama2", "llama2")


def refused(tmp_path, base, match, out_name="out", **options):
    out = tmp_path / out_name
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        upcycle(base, out, progress=False, **options)
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".staging-" in f]


def test_option_errors(dense_dir, tmp_path):
    refused(tmp_path, dense_dir, r"--top-k 9 does not fit 8 experts", num_experts=8, top_k=9)
    refused(tmp_path, dense_dir, r"96 neurons.*5 equal parts", method="random", num_experts=5, top_k=2)
    refused(tmp_path, dense_dir, r"clustering makes 7 equal clusters", method="clustering", num_experts=7)
    refused(
        tmp_path, dense_dir, r"unknown upcycling method 'moefy'; choose one of copy, random, clustering", method="moefy"
    )
    refused(tmp_path, dense_dir, r"--moe-layers .*names layers \[7\]", moe_layers="0,7")
    refused(
        tmp_path,
        dense_dir,
        r"--top-k 3 must be a multiple of --granularity 2",
        method="granular",
        num_experts=8,
        top_k=3,
        granularity=2,
    )
    refused(tmp_path, dense_dir, r"--granularity 5 does not divide the FFN size 96", method="granular", granularity=5)
    refused(tmp_path, dense_dir, r"--drop-ratio must be in \[0, 1\]", method="drop", drop_ratio=1.5)
    refused(tmp_path, dense_dir, r"--shared-experts needs a method that splits", shared_experts=1)
    refused(
        tmp_path, dense_dir, r"--router-init centroids needs --method clustering or gradient", router_init="centroids"
    )
    refused(tmp_path, dense_dir, r"--method gradient needs the base model.s tokenizer", method="gradient")
    # A method option with choices is checked before the base is opened (this base does not even exist).
    missing = str(tmp_path / "no-such-model")
    refused(
        tmp_path,
        missing,
        r"--cluster-on 'down' is unknown; choose one of \['up', 'gate'\]",
        method="clustering",
        cluster_on="down",
    )
    refused(tmp_path, missing, r"--granular-scaling 'x' is unknown", method="granular", granular_scaling="x")
    refused(
        tmp_path,
        missing,
        r"--output-scale 'norm' is unknown; choose one of \['k', 'fit'\]",
        method="carve",
        output_scale="norm",
    )
    refused(
        tmp_path,
        dense_dir,
        r"--calibration-data .*nothing.txt does not exist",
        method="gradient",
        calibration_data=str(tmp_path / "nothing.txt"),
    )
    refused(tmp_path, dense_dir, r"unknown upcycling option\(s\) \['num_expert'\]", num_expert=4)
    refused(tmp_path, dense_dir, r"Unknown format 'onnx'", format="onnx")
    refused(tmp_path, dense_dir, r"must end in .gguf", format="gguf")  # OUT names a file for gguf
    refused(
        tmp_path,
        dense_dir,
        r"(?s)llama.cpp cannot compute.*dense",
        format="gguf",
        out_name="moe.gguf",
        moe_layers="every-other",
    )
    refused(
        tmp_path,
        dense_dir,
        r"(?s)does not fit format 'mixtral'.*no shared expert",
        format="mixtral",
        method="random",
        num_experts=4,
        shared_experts=2,
    )
    refused(tmp_path, dense_dir, r"--max-shard-size 'lots'", max_shard_size="lots")


def test_option_errors_come_before_the_model_is_opened(tmp_path, monkeypatch):
    """A .gguf base is dequantized when opened: option mistakes must not wait for that."""
    import importlib

    core = importlib.import_module("llama_moe.conversion.pipeline")

    def must_not_open(base):
        raise AssertionError("the base model was opened before the options were checked")

    monkeypatch.setattr(core, "open_dense", must_not_open)
    refused(tmp_path, str(tmp_path / "model.gguf"), r"--top-k 9 does not fit 8 experts", num_experts=8, top_k=9)
    refused(tmp_path, str(tmp_path / "model.gguf"), r"--router-init centroids needs", router_init="centroids")


def test_input_errors(dense_dir, tmp_path):
    refused(tmp_path, tmp_path / "nowhere", r"does not exist")
    refused(tmp_path, str(tmp_path / "missing.gguf"), r"does not exist")
    refused(tmp_path, "some-org/some-model", r"Hub is offline")

    mistral = tmp_path / "mistral"
    shutil.copytree(dense_dir, mistral)
    config = json.load(open(mistral / "config.json"))
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    json.dump(config, open(mistral / "config.json", "w"))
    refused(tmp_path, mistral, r"MistralForCausalLM checkpoint; upcycling supports LlamaForCausalLM")

    empty = tmp_path / "empty"
    empty.mkdir()
    refused(tmp_path, empty, r"has no config.json")

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(dense_dir, "config.json"), no_weights / "config.json")
    refused(tmp_path, no_weights, r"no model.safetensors")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(dense_dir, corrupt)
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.write(b"\xff" * 16)  # clobber the header length and the start of the header
    refused(tmp_path, corrupt, r"corrupt")

    truncated = tmp_path / "truncated"
    shutil.copytree(dense_dir, truncated)
    size = os.path.getsize(truncated / "model.safetensors")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(size // 2)
    refused(tmp_path, truncated, r"truncated|corrupt")

    already = tmp_path / "already"
    already.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        upcycle(dense_dir, already, progress=False)


def test_missing_shard_and_missing_tensor(dense_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(dense_dir, "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(os.path.join(dense_dir, "config.json"), sharded / "config.json")
    names = sorted(tensors)
    half = len(names) // 2
    files = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    json.dump(
        {"weight_map": {n: f for f, ns in files.items() for n in ns}},
        open(sharded / "model.safetensors.index.json", "w"),
    )
    save_file({n: tensors[n] for n in files["a.safetensors"]}, str(sharded / "a.safetensors"))
    refused(tmp_path, sharded, r"lacks shard file\(s\) \['b.safetensors'\]")

    lacking = tmp_path / "lacking"
    lacking.mkdir()
    shutil.copy(os.path.join(dense_dir, "config.json"), lacking / "config.json")
    save_file(
        {n: t for n, t in tensors.items() if n != "model.layers.1.mlp.up_proj.weight"},
        str(lacking / "model.safetensors"),
    )
    refused(tmp_path, lacking, r"lacks tensors \['model.layers.1.mlp.up_proj.weight'\]")


def test_cli_turns_errors_into_one_line(dense_dir, tmp_path, capsys):
    from llama_moe.cli.main import main

    code = main(["upcycle", dense_dir, str(tmp_path / "out"), "--num-experts", "2", "--top-k", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "llama-moe upcycle: error: --top-k 3 does not fit 2 experts: pick 1 <= top-k <= num-experts."
    assert not (tmp_path / "out").exists()
