"""lm-evaluation-harness on project checkpoints: the real `lm_eval` command, the Python wrapper, presets, and
the copy-upcycled model scoring exactly like its dense base."""

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from llama_moe.cli import eval as eval_cli
from llama_moe.evaluation import lm_eval_runner as runner


def test_real_lm_eval_command_scores_a_project_checkpoint(tiny_moe_dir, tmp_path):
    lm_eval = shutil.which("lm_eval") or os.path.join(os.path.dirname(sys.executable), "lm_eval")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH="")
    command = [
        lm_eval,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={tiny_moe_dir},trust_remote_code=True",
        "--tasks",
        runner.LOCAL_TASK_TAG,
        "--include_path",
        str(runner.local_tasks_dir()),
        "--limit",
        "3",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    results = json.loads(open(results_file).read())["results"]
    assert set(results) == {
        "llama_moe_docstring_mc",
        "llama_moe_next_line_mc",
        "llama_moe_prose_cloze",
        "llama_moe_stdlib_ppl",
    }
    for task in ("llama_moe_docstring_mc", "llama_moe_next_line_mc"):
        assert 0.0 <= results[task]["acc,none"] <= 1.0
        assert results[task]["sample_len"] == 3
    # A random model over a 49152-token vocabulary: about log2(49152) / (bytes per token) bits per byte.
    bits_per_byte = results["llama_moe_stdlib_ppl"]["bits_per_byte,none"]
    assert math.isfinite(bits_per_byte) and 1.0 < bits_per_byte < 16.0


def test_copy_upcycled_model_scores_the_same_loglikelihoods_as_its_dense_base(dense_dir, upcycled_dir):
    specs = runner.parse_task_specs([runner.LOCAL_TASK_TAG], None, None)
    manager = runner.build_task_manager(specs)
    dense = runner.evaluate(str(dense_dir), specs, limit=4, device="cpu", log_samples=True, task_manager=manager)
    moe = runner.evaluate(str(upcycled_dir), specs, limit=4, device="cpu", log_samples=True, task_manager=manager)
    assert sorted(dense.samples) == sorted(moe.samples) == sorted(runner.local_task_names()[1:])
    compared = 0
    for task, dense_samples in dense.samples.items():
        for dense_sample, moe_sample in zip(dense_samples, moe.samples[task], strict=True):
            assert dense_sample["doc_id"] == moe_sample["doc_id"]
            for dense_resp, moe_resp in zip(dense_sample["resps"], moe_sample["resps"], strict=True):
                dense_ll = dense_resp[0][0] if isinstance(dense_resp[0], (list, tuple)) else dense_resp[0]
                moe_ll = moe_resp[0][0] if isinstance(moe_resp[0], (list, tuple)) else moe_resp[0]
                assert moe_ll == pytest.approx(dense_ll, rel=1e-5, abs=1e-4)
                compared += 1
    assert compared >= 4 * 4 * 2 + 4  # two 4-way multiple-choice tasks + one rolling task
    for label in dense.scores:
        for metric in ("acc", "acc_norm", "bits_per_byte"):
            if metric in dense.scores[label]:
                assert moe.scores[label][metric] == pytest.approx(dense.scores[label][metric], rel=1e-5)


def test_eval_cli_compare_writes_one_table_with_deltas(dense_dir, upcycled_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = eval_cli.main(
        [
            str(upcycled_dir),
            "--compare",
            str(dense_dir),
            "--tasks",
            "llama_moe_docstring_mc",
            "llama_moe_stdlib_ppl",
            "--limit",
            "3",
            "--device",
            "cpu",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in data["comparison"]}
    assert {("llama_moe_docstring_mc", "acc"), ("llama_moe_stdlib_ppl", "bits_per_byte")} <= set(rows)
    for row in rows.values():
        assert row["delta"] == pytest.approx(row["moe"] - row["base"])
        assert abs(row["delta"]) <= 1e-4 * max(1.0, abs(row["base"]))  # copy upcycling keeps the function
    assert rows[("llama_moe_stdlib_ppl", "bits_per_byte")]["higher_is_better"] is False
    table = (out / "results.md").read_text()
    assert "| task | metric | base | MoE | delta |" in table and "llama_moe_docstring_mc" in table
    assert "llama-moe eval: 2 task result(s)" in capsys.readouterr().out


def test_task_specs_presets_and_fewshot():
    specs = runner.parse_task_specs(None, "llama-moe-v1", None)
    assert runner.TaskSpec("arc_challenge", 25) in specs and runner.TaskSpec("hellaswag", 10) in specs
    assert runner.TaskSpec("boolq", 32) in specs and runner.TaskSpec("mmlu", 5) in specs and len(specs) == 10
    llama3 = runner.parse_task_specs(None, "llama3-meets-moe", None)
    assert runner.TaskSpec("mmlu", 0) in llama3 and runner.TaskSpec("mmlu", 5) in llama3
    assert {s.name for s in llama3} == {"mmlu", "truthfulqa_mc2", "piqa", "sciq", "logiqa", "boolq", "openbookqa"}
    mixed = runner.parse_task_specs(["a,b:5", "c"], None, 2)
    assert mixed == [runner.TaskSpec("a", 2), runner.TaskSpec("b", 5), runner.TaskSpec("c", 2)]
    with pytest.raises(ValueError, match="Unknown preset"):
        runner.parse_task_specs(None, "nope", None)
    with pytest.raises(ValueError, match="No tasks given"):
        runner.parse_task_specs([], None, None)
    with pytest.raises(ValueError, match="few-shot count"):
        runner.parse_task_specs(["arc_easy:x"], None, None)


def _unloadable_model(tmp_path):
    """A folder that passes the path check (it has a config.json) but holds no weights: loading it would fail."""
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_preset_offline_fails_with_a_clear_message_before_loading_a_model(tmp_path):
    # HF_HUB_OFFLINE=1 is set for the test session; the model has no weights: no model is loaded.
    with pytest.raises(ValueError, match=r"need datasets from the Hugging Face Hub.*--tasks llama_moe_local"):
        eval_cli.main([_unloadable_model(tmp_path), "--tasks", "sciq", "--output", str(tmp_path / "out")])


def test_unknown_task_is_named(tmp_path):
    with pytest.raises(ValueError, match="Unknown lm-eval task.*not_a_task"):
        eval_cli.main([_unloadable_model(tmp_path), "--tasks", "not_a_task"])
