"""Atomic output (conversion/atomic.py): a crash at any step leaves a complete folder or file under the target
name, the old or the new one, and nothing half-written that looks finished."""

import fnmatch
import os

import pytest
import torch
from safetensors.torch import load_file

from llama_moe.conversion import atomic
from llama_moe.conversion.atomic import (
    TEMPORARY_FILE_PATTERN,
    atomic_output_dir,
    atomic_write_text,
    recover_dirs,
    replace_dir,
)
from llama_moe.modeling import LlamaMoEForCausalLM
from tests.conftest import tiny_moe_config


def save_model(folder, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaMoEForCausalLM(tiny_moe_config())
    model.save_pretrained(folder)
    return load_file(os.path.join(folder, "model.safetensors"))


def model_in(folder) -> dict[str, torch.Tensor]:
    """The weights of the complete model in `folder` (config, code and weights all there)."""
    assert {"config.json", "modeling_llama_moe.py", "model.safetensors"} <= set(os.listdir(folder))
    model = LlamaMoEForCausalLM.from_pretrained(folder)
    return {name: tensor for name, tensor in model.state_dict().items() if name != "lm_head.weight"}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


class Crash(OSError):
    pass


def crash_at(monkeypatch, step: int) -> None:
    """Make the `step`-th file-system step of `replace_dir` (1: old aside, 2: new in, 3: old removed) raise; the
    steps after it (a rollback) run normally."""
    rename, rmtree = os.rename, atomic.shutil.rmtree
    calls = {"n": 0}

    def counted(real):
        def step_function(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == step:
                raise Crash(f"crash at step {step}")
            return real(*args, **kwargs)

        return step_function

    monkeypatch.setattr(atomic.os, "rename", counted(rename))
    monkeypatch.setattr(atomic.shutil, "rmtree", counted(rmtree))


def finished_looking(parent) -> list[str]:
    """Entries of `parent` that a user or a loader could take for a finished output: not hidden, not temporary."""
    return sorted(name for name in os.listdir(parent) if not name.startswith(".") and ".tmp-" not in name)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_crash_at_any_step_of_the_swap_leaves_a_complete_model(tmp_path, monkeypatch, step):
    target, new = tmp_path / "final", tmp_path / ".staging" / "final"
    old_weights = save_model(target, seed=0)
    new_weights = save_model(new, seed=1)
    assert not same(old_weights, new_weights)

    crash_at(monkeypatch, step)
    with pytest.raises(Crash):
        replace_dir(new, target)
    monkeypatch.undo()

    assert same(model_in(target), new_weights if step == 3 else old_weights)
    assert finished_looking(tmp_path) == ["final"]
    if step < 3:  # the new model is still whole where it was built: the swap can be retried
        replace_dir(new, target)
        assert same(model_in(target), new_weights)
    recover_dirs(tmp_path)  # what the next run does first
    assert sorted(os.listdir(tmp_path)) == [".staging", "final"]
    assert same(model_in(target), new_weights)


def test_a_process_killed_between_the_renames_gets_the_old_model_back(tmp_path):
    """No exception handler runs when the process is killed after moving the old folder aside: the next run's
    `recover_dirs` (training does it first) renames it back before anything else happens."""
    target, new = tmp_path / "checkpoint-2", tmp_path / ".staging" / "checkpoint-2"
    old_weights = save_model(target, seed=0)
    new_weights = save_model(new, seed=1)
    os.rename(target, tmp_path / ".checkpoint-2.old")  # step 1 done, then killed
    assert finished_looking(tmp_path) == []
    recover_dirs(tmp_path)
    assert same(model_in(target), old_weights)
    replace_dir(new, target)
    assert same(model_in(target), new_weights)
    assert sorted(os.listdir(tmp_path)) == [".staging", "checkpoint-2"]


@pytest.mark.parametrize("step", [1, 2, 3])
def test_an_overwritten_output_folder_is_complete_after_a_crash(tmp_path, monkeypatch, step):
    out = tmp_path / "out"
    old_weights = save_model(out, seed=0)
    with pytest.raises(Crash), atomic_output_dir(out, overwrite=True) as tmp:
        new_weights = save_model(tmp, seed=1)
        crash_at(monkeypatch, step)
    monkeypatch.undo()
    assert same(model_in(out), new_weights if step == 3 else old_weights)
    assert finished_looking(tmp_path) == ["out"]


def test_an_interrupted_output_folder_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp_path / "out.tmp-probe").mkdir()  # another run's temporary is not touched
        save_model(tmp, seed=0)
        raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["out.tmp-probe"]


def test_files_are_replaced_whole_and_their_temporaries_are_hidden(tmp_path, monkeypatch):
    path = tmp_path / "reports" / "report.md"
    atomic_write_text(path, "old\n")
    seen = []

    def interrupted(tmp, out):
        seen.extend(os.listdir(path.parent))
        raise Crash("killed before the rename")

    monkeypatch.setattr(atomic.os, "replace", interrupted)
    with pytest.raises(Crash):
        atomic_write_text(path, "new\n")
    monkeypatch.undo()
    temporaries = [name for name in seen if name != "report.md"]
    assert len(temporaries) == 1 and fnmatch.fnmatch(temporaries[0], TEMPORARY_FILE_PATTERN)
    assert path.read_text() == "old\n" and os.listdir(path.parent) == ["report.md"]
