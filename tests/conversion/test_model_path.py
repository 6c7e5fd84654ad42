"""One rule for where a model is: a folder with config.json, an existing .gguf file, or a Hub id."""

import pytest

from llama_moe.conversion.model_path import is_hub_id, locate_model


def test_folder_gguf_and_hub_id_and_how_transformers_opens_them(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    folder = locate_model(tmp_path / "model")
    assert folder.kind == "folder" and folder.from_pretrained_arguments() == (str(tmp_path / "model"), {})
    gguf = locate_model(str(tmp_path / "tiny.gguf"))
    assert gguf.kind == "gguf"
    assert gguf.from_pretrained_arguments() == (str(tmp_path), {"gguf_file": "tiny.gguf"})
    hub = locate_model("HuggingFaceTB/SmolLM2-135M")
    assert hub.kind == "hub" and hub.from_pretrained_arguments() == ("HuggingFaceTB/SmolLM2-135M", {})


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.gguf", r"GGUF file .*missing.gguf does not exist"),
        ("empty", r"empty has no config.json"),
        ("weights.safetensors", r"weights.safetensors is not a model"),
        ("nowhere/at/all", r"nowhere/at/all does not exist.*not a Hub id"),
    ],
)
def test_wrong_paths_get_one_clear_error(tmp_path, name, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=message):
        locate_model(tmp_path / name)


def test_hub_ids_are_org_slash_name_and_never_paths():
    assert is_hub_id("meta-llama/Llama-3.2-1B") and is_hub_id("org/name.v2")
    assert not any(map(is_hub_id, ["./org/name", "/org/name", "~/name", "name", "a/b/c"]))
