"""The local lm-eval tasks: data rebuilt deterministically from the stdlib, small, loadable from any directory."""

import json
import sys

import pytest

from llama_moe.evaluation.lm_eval_runner import LOCAL_TASK_TAG, local_task_names, local_tasks_dir

TASKS = ["llama_moe_docstring_mc", "llama_moe_next_line_mc", "llama_moe_prose_cloze", "llama_moe_stdlib_ppl"]
SIZE_CAPS = {"prose_cloze.jsonl": 450_000}  # 1000 items: a 0.03 change in accuracy is outside its noise


def test_shipped_files_are_small_and_well_formed():
    folder = local_tasks_dir()
    files = sorted(folder.glob("*.jsonl"))
    assert [f.name for f in files] == [
        "prose_cloze.jsonl",
        "stdlib_docs_ppl.jsonl",
        "stdlib_docstring_mc.jsonl",
        "stdlib_next_line_mc.jsonl",
    ]
    for path in files:
        assert path.stat().st_size < SIZE_CAPS.get(path.name, 200_000)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) >= 50
        for row in rows:
            if "choices" in row:
                assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
                assert 0 <= row["label"] < 4
            else:
                assert len(row["text"]) >= 300
    assert local_task_names() == [LOCAL_TASK_TAG] + TASKS


@pytest.mark.skipif(
    sys.version_info[:3] != (3, 11, 7), reason="the committed data was built from Python 3.11.7's stdlib"
)
def test_build_script_reproduces_the_committed_data(tmp_path):
    sys.path.insert(0, str(local_tasks_dir()))
    try:
        import build_tasks
    finally:
        sys.path.pop(0)
    assert build_tasks.main([str(tmp_path)]) == 0
    for name in (
        "prose_cloze.jsonl",
        "stdlib_docs_ppl.jsonl",
        "stdlib_docstring_mc.jsonl",
        "stdlib_next_line_mc.jsonl",
    ):
        assert (tmp_path / name).read_bytes() == (local_tasks_dir() / name).read_bytes()


def test_docstring_task_answers_are_real_stdlib_functions():
    import importlib

    rows = [json.loads(line) for line in (local_tasks_dir() / "stdlib_docstring_mc.jsonl").read_text().splitlines()]
    checked = 0
    for row in rows[:40]:
        try:
            module = importlib.import_module(row["module"])
        except Exception:  # platform-specific modules
            continue
        answer = row["choices"][row["label"]]
        assert callable(getattr(module, answer)), (row["module"], answer)
        checked += 1
    assert checked >= 30


def test_tasks_load_through_lm_eval_from_another_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)  # data_files must resolve next to the YAML, not the working directory
    manager = TaskManager(include_path=str(local_tasks_dir()), include_defaults=False)
    loaded = manager.load([LOCAL_TASK_TAG])["tasks"]
    assert sorted(loaded) == TASKS
    docs = list(loaded["llama_moe_docstring_mc"].test_docs())
    assert len(docs) == 400 and docs[0]["choices"][docs[0]["label"]] in docs[0]["choices"]
    assert loaded["llama_moe_stdlib_ppl"].OUTPUT_TYPE == "loglikelihood_rolling"
