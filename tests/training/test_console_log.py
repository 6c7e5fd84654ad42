"""The console shows the loss and the MoE summary, not one line item per expert and layer; the full
per-layer loads still reach the log history (checked in test_train.py)."""

from types import SimpleNamespace

import pytest

from llama_moe.training.callbacks import MoEPrinterCallback, MoEProgressCallback


@pytest.mark.parametrize("console", ["progress bar", "printer (--disable_tqdm)"])
def test_console_hides_per_layer_expert_loads_only(console, monkeypatch):
    written = []
    if console == "progress bar":
        callback = MoEProgressCallback()
        callback.training_bar = SimpleNamespace(write=written.append)
    else:
        callback = MoEPrinterCallback()
        monkeypatch.setattr("builtins.print", lambda *args, **kwargs: written.append(" ".join(map(str, args))))
    logs = {
        "loss": 2.5,
        "aux_loss": 2.0,
        "moe/load_cv_mean": 0.4,
        "moe/layer_3/expert_1": 0.2,
        "moe/layer_3/load_cv": 0.5,
        "mixture/weight/code": 0.6,
    }
    state = SimpleNamespace(is_world_process_zero=True, is_local_process_zero=True)
    callback.on_log(SimpleNamespace(), state, None, logs=logs)
    assert len(written) == 1
    line = written[0]
    for key in ("loss", "aux_loss", "moe/load_cv_mean", "mixture/weight/code"):
        assert key in line
    assert "moe/layer_3" not in line
    assert "moe/layer_3/expert_1" in logs  # the caller's dict (what integrations get) is untouched
