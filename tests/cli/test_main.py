"""The `llama-moe` command: its table of subcommands, --help on each, one-line errors with exit code 2,
and the conversion subcommands that only the CLI wires together (export, --from llama-moe-v1)."""

import subprocess
import sys

import pytest
import torch
from transformers import MixtralForCausalLM

from llama_moe.cli.main import SUBCOMMANDS, main
from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import tiny_moe_config
from tests.conversion.test_formats_llama_moe_v1 import V1_CASES, _v1_checkpoint, _v1_reference_model


def test_top_level_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"  {name}" in text


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    try:
        code = main([name, "--help"])
    except SystemExit as exit_:  # argparse ends --help with SystemExit(0)
        code = exit_.code
    assert code == 0
    text = capsys.readouterr().out
    assert f"llama-moe {name}" in text or (name == "train" and "--model_name_or_path" in text)


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "llama_moe.cli.main", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "quickstart" in result.stdout


def test_unknown_command_and_user_errors_are_one_line(capsys, tmp_path):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["upcycle", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llama-moe upcycle: error:") and "missing" in err[0]
    assert not (tmp_path / "out").exists()


def test_export_subcommand_writes_a_plain_mixtral(tmp_path):
    model = LlamaMoEForCausalLM(tiny_moe_config(routed_scaling_factor=2.0)).eval()
    model.save_pretrained(tmp_path / "moe")
    assert main(["export", str(tmp_path / "moe"), str(tmp_path / "mixtral"), "--format", "mixtral"]) == 0
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(mixtral(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_upcycle_from_llama_moe_v1_imports_with_the_same_logits(tmp_path):
    config, weights = _v1_checkpoint(tmp_path / "v1", **V1_CASES["released_recipe"])
    assert main(["upcycle", str(tmp_path / "v1"), str(tmp_path / "ours"), "--from", "llama-moe-v1"]) == 0
    ours = LlamaMoEForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids).logits, _v1_reference_model(config, weights)(ids).logits, atol=2e-5, rtol=1e-4
        )


def test_missing_extra_and_bad_model_path_fail_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    import llama_moe.evaluation.lm_eval_runner as runner

    def must_not_build(*args, **kwargs):
        raise AssertionError("lm-eval tasks were built before the model path was checked")

    monkeypatch.setattr(runner, "build_task_manager", must_not_build)
    assert main(["eval", str(tmp_path), "--tasks", "llama_moe_local"]) == 2
    assert "has no config.json" in capsys.readouterr().err

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    assert main(["analyze", str(tmp_path), "--data", f"x={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "llama-moe analyze needs matplotlib: pip install 'llama-moe[eval]'" in err


def test_train_help_shows_our_options_first_and_is_short(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.index("--config RECIPE.yaml") < text.index("--distill_from") < text.index("--output_dir")
    assert len(text.splitlines()) < 150 and "--help-all" in text and "--adam_beta1" not in text
    assert main(["train", "--help-all"]) == 0
    assert "--adam_beta1" in capsys.readouterr().out
