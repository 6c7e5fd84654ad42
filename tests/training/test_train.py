"""End-to-end `llama-moe train` runs on a tiny random LlamaMoE and stdlib text (code folder + docstring JSONL)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.training.helpers import log_history, run_train, train_args, train_losses


def test_loss_goes_down_with_moe_logs_and_loadable_checkpoints(tmp_path, corpora, tiny_model_dir):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, corpora, out, 30, save_steps=15, router_z_loss_coef=1e-3)
    assert run_train(args) == 0
    history = log_history(out / "checkpoint-30")
    losses = train_losses(history)
    assert len(losses) == 30
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.5, (first, last)
    entry = history[0]
    # Router losses are logged separately; per-layer expert load fractions sum to 1; CV/entropy present.
    assert entry["aux_loss"] > 0 and entry["z_loss"] > 0
    for layer in (0, 1):
        fractions = [entry[f"moe/layer_{layer}/expert_{e}"] for e in range(4)]
        assert sum(fractions) == pytest.approx(1.0, abs=1e-3)
        assert f"moe/layer_{layer}/load_cv" in entry and f"moe/layer_{layer}/load_entropy" in entry
    assert entry["moe/dropped_fraction"] == 0.0  # dropless
    assert entry["tokens_per_second"] > 0
    assert entry["mixture/weight/code"] == pytest.approx(0.5)
    # Checkpoints are complete Hugging Face folders with our code, renamed into place (nothing left staged).
    assert sorted(os.listdir(out)) == ["README.md", "checkpoint-15", "checkpoint-30", "final"]
    from transformers import AutoModelForCausalLM

    for folder in ("checkpoint-15", "final"):
        files = set(os.listdir(out / folder))
        assert {"modeling_llama_moe.py", "configuration_llama_moe.py", "model.safetensors", "config.json"} <= files
        model = AutoModelForCausalLM.from_pretrained(out / folder, trust_remote_code=True)
        saved = load_file(out / folder / "model.safetensors")
        router = "model.layers.0.mlp.gate.weight"
        assert torch.equal(model.state_dict()[router], saved[router])
    assert json.load(open(out / "checkpoint-15" / "mixture_state.json"))["next_index"] >= 15 * 4
    # The final model is what the Hub gets: no pickles (the Trainer's training_args.bin stays in checkpoints).
    assert not [f for f in os.listdir(out / "final") if f.endswith((".bin", ".pt", ".pth"))]


def test_routers_only_then_all_freezes_exactly_the_routers(tmp_path, corpora, tiny_model_dir):
    out = tmp_path / "run"
    assert run_train(train_args(tiny_model_dir, corpora, out, 3, save_steps=2, freeze="routers_only:2")) == 0
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after2 = load_file(out / "checkpoint-2" / "model.safetensors")
    after3 = load_file(out / "checkpoint-3" / "model.safetensors")
    routers = {name for name in start if name.endswith("mlp.gate.weight")}
    assert routers == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}
    for name in start:
        if name in routers:
            assert not torch.equal(start[name], after2[name]), name
        else:  # experts' gate_up_proj included: frozen bit for bit, no weight decay either
            assert torch.equal(start[name], after2[name]), name
    changed = [name for name in start if name not in routers and not torch.equal(after2[name], after3[name])]
    assert "model.layers.0.mlp.experts.gate_up_proj" in changed and "model.layers.0.self_attn.q_proj.weight" in changed


def test_resume_continues_with_same_losses_weights_and_data(tmp_path, corpora, tiny_model_dir):
    # Dynamic sampling with an evaluation before the checkpoint, so the weights have moved when it is saved.
    flags = dict(
        save_steps=3,
        sampling="dynamic",
        eval_strategy="steps",
        eval_steps=2,
        eta=5.0,
        reference_losses="code=1.0,docs=1.0",
        dataset_weights="code=0.7,docs=0.3",
    )
    full = tmp_path / "full"
    assert run_train(train_args(tiny_model_dir, corpora, full, 6, **flags)) == 0
    resumed = tmp_path / "resumed"
    args = train_args(tiny_model_dir, corpora, resumed, 6, **flags)
    assert run_train(args + ["--resume_from_checkpoint", str(full / "checkpoint-3")]) == 0
    expected = train_losses(log_history(full / "checkpoint-6"))
    got = train_losses(log_history(resumed / "checkpoint-6"))
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    state_full = json.load(open(full / "checkpoint-6" / "mixture_state.json"))
    state_resumed = json.load(open(resumed / "checkpoint-6" / "mixture_state.json"))
    assert state_full["weights"] == pytest.approx(state_resumed["weights"])
    assert state_full["positions"] == state_resumed["positions"]
    saved = json.load(open(full / "checkpoint-3" / "mixture_state.json"))
    assert saved["weights"]["code"] != pytest.approx(0.7)  # the update at step 2 was saved


def test_dynamic_sampling_moves_weight_to_the_lagging_domain(tmp_path, corpora, tiny_model_dir):
    # docs is kept lagging: its reference loss (0.5) is far below anything a tiny model reaches in 8 steps, while
    # code's reference (20) is already beaten. Only docs has an excess loss, so weight must flow to it.
    out = tmp_path / "run"
    flags = dict(sampling="dynamic", eval_strategy="steps", eval_steps=2, eta=0.2, reference_losses="code=20,docs=0.5")
    assert run_train(train_args(tiny_model_dir, corpora, out, 8, **flags)) == 0
    history = log_history(out / "checkpoint-8")
    docs_weights = [e["mixture/weight/docs"] for e in history if "mixture/weight/docs" in e]
    assert docs_weights[0] == pytest.approx(0.5)
    assert docs_weights[-1] > 0.75 and docs_weights == sorted(docs_weights), docs_weights
    # The logged weights are the update rule applied to the logged held-out losses.
    from llama_moe.training.mixture import dynamic_update

    weights = {"code": 0.5, "docs": 0.5}
    for step in (2, 4, 6):
        losses = {
            d: next(e[f"eval_{d}_loss"] for e in history if e["step"] == step and f"eval_{d}_loss" in e)
            for d in ("code", "docs")
        }
        weights = dynamic_update(weights, losses, {"code": 20.0, "docs": 0.5}, 0.2, 1e-4)
        logged = next(e for e in history if e["step"] == step + 1 and "mixture/weight/docs" in e)
        assert logged["mixture/weight/docs"] == pytest.approx(weights["docs"], abs=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpora, tiny_model_dir, capsys, monkeypatch):
    from llama_moe.training.trainer import MoETrainer

    original, calls = MoETrainer.compute_loss, []

    def nan_at_step_4(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if self.model.training:
            calls.append(1)
            if len(calls) == 4:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(MoETrainer, "compute_loss", nan_at_step_4)
    out = tmp_path / "run"
    assert run_train(train_args(tiny_model_dir, corpora, out, 6, save_steps=2)) == 2
    message = capsys.readouterr().err
    assert "NaN or infinite at step 4" in message and "checkpoint-2" in message
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-2"]
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_weights_are_never_checkpointed(tmp_path, corpora, tiny_model_dir, capsys, monkeypatch):
    from llama_moe.training.trainer import MoETrainer

    original = MoETrainer.training_step

    def poison_during_step_2(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)  # step 2's loss is finite...
        if self.state.global_step == 1:
            with torch.no_grad():  # ...but a weight goes infinite before its optimizer step
                self.model.model.layers[0].mlp.experts.down_proj[0, 0, 0] = float("inf")
        return loss

    monkeypatch.setattr(MoETrainer, "training_step", poison_during_step_2)
    out = tmp_path / "run"
    assert run_train(train_args(tiny_model_dir, corpora, out, 4, save_steps=1)) == 2
    message = capsys.readouterr().err
    assert "model weights are NaN or infinite at step 2" in message and "checkpoint-1" in message
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-1"]
    assert not any(p.startswith("checkpoint") for p in os.listdir(out / ".staging"))


def test_unfinished_saves_of_an_interrupted_run_are_removed(tmp_path, corpora, tiny_model_dir, capsys):
    out = tmp_path / "run"
    leftover = out / ".staging" / "checkpoint-2"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a file")
    assert run_train(train_args(tiny_model_dir, corpora, out, 2)) == 0
    assert not (out / ".staging").exists()
    assert "unfinished saves of an interrupted run" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["README.md", "checkpoint-2", "final"]


def test_a_crash_while_the_final_model_is_swapped_in_keeps_a_complete_one(
    tmp_path, corpora, tiny_model_dir, monkeypatch
):
    """A second run into the same folder replaces `final` in three steps (conversion/atomic.py, tested step by
    step there); killed while renaming the new model in, the folder still holds the first run's model, whole."""
    from transformers import AutoModelForCausalLM

    from llama_moe.conversion import atomic

    out = tmp_path / "run"
    assert run_train(train_args(tiny_model_dir, corpora, out, 1)) == 0
    first = load_file(out / "final" / "model.safetensors")
    rename = os.rename

    def crash_renaming_final_in(src, dst):
        if os.fspath(dst) == os.fspath(out / "final") and ".staging" in os.fspath(src):
            raise OSError("killed while renaming the new final model in")
        return rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", crash_renaming_final_in)
    with pytest.raises(OSError, match="killed"):
        run_train(train_args(tiny_model_dir, corpora, out, 2))
    monkeypatch.undo()
    model = AutoModelForCausalLM.from_pretrained(out / "final", trust_remote_code=True)
    weights = model.state_dict()
    assert all(torch.equal(weights[name], tensor) for name, tensor in first.items())
    second = load_file(out / ".staging" / "final" / "model.safetensors")  # built whole, never renamed in
    assert not torch.equal(second["model.layers.0.mlp.gate.weight"], first["model.layers.0.mlp.gate.weight"])
    assert sorted(p for p in os.listdir(out) if not p.startswith(".")) == [
        "README.md",
        "checkpoint-1",
        "checkpoint-2",
        "final",
    ]
