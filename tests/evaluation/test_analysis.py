"""Perplexity, routing statistics, parameter counts, plots and report of `llama-moe analyze`."""

import json
import math
import struct
import sysconfig
from pathlib import Path

import pytest
import torch

from llama_moe.cli import analyze as analyze_cli
from llama_moe.evaluation.analysis import parse_data_args
from llama_moe.evaluation.lm_eval_runner import EvalRun, local_tasks_dir, write_results
from llama_moe.evaluation.perplexity import domain_perplexity, read_domain_texts
from llama_moe.evaluation.plots import make_plots
from llama_moe.evaluation.report import write_report
from llama_moe.evaluation.routing import RoutingStats
from llama_moe.evaluation.speed import parameter_counts
from llama_moe.evaluation.unseen_domain import UNSEEN_DOMAIN
from tests.conftest import tiny_moe_config


def test_routing_statistics_match_hand_computed_values():
    stats = RoutingStats(layers=[3], num_experts=4, top_k=2)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 3.0, 2.0, 1.0], [5.0, 0.0, 0.0, 4.0]])
    stats.update((logits[:2],))
    stats.update((logits[2:],))  # counts accumulate over forward passes
    layer = stats.summary()["per_layer"]["3"]
    # top-2 sets: {0,1}, {1,2}, {0,3}; top-1: 0, 1, 0
    assert layer["token_fraction"] == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])
    share = [1 / 3, 1 / 3, 1 / 6, 1 / 6]
    assert layer["load_share"] == pytest.approx(share)
    assert layer["load_cv"] == pytest.approx(0.5 / 1.5)  # counts [2, 2, 1, 1]: std 0.5, mean 1.5
    entropy = -sum(p * math.log(p) for p in share)
    assert layer["load_entropy"] == pytest.approx(entropy)
    assert layer["load_entropy_normalized"] == pytest.approx(entropy / math.log(4))
    assert layer["top1_expert"] == 0 and layer["top1_agreement"] == pytest.approx(2 / 3)
    co = torch.tensor(layer["coselection"], dtype=torch.float64)
    expected = torch.zeros(4, 4)
    for pair in ((0, 1), (1, 2), (0, 3)):
        for i in pair:
            for j in pair:
                expected[i, j] += 1 / 3
    assert torch.allclose(co, expected.double())
    probs = torch.softmax(logits, dim=-1).mean(0)
    assert layer["mean_router_prob"] == pytest.approx(probs.tolist())


def test_routing_counts_agree_with_the_models_own_expert_load():
    from llama_moe.modeling import LlamaMoEForCausalLM

    config = tiny_moe_config(num_hidden_layers=3, moe_layers=[0, 2], num_local_experts=4, num_experts_per_tok=2)
    model = LlamaMoEForCausalLM(config).eval()
    stats = RoutingStats(layers=config.moe_layers, num_experts=4, top_k=2)
    with torch.no_grad():
        outputs = model(input_ids=torch.randint(0, 128, (1, 40)), output_router_logits=True)
    stats.update(outputs.router_logits)
    summary = stats.summary()
    assert summary["layers"] == [0, 2] and summary["tokens"] == 40
    for layer, load in model.expert_load().items():
        fraction = torch.tensor(summary["per_layer"][str(layer)]["token_fraction"], dtype=torch.float64)
        assert torch.allclose(fraction * 40, load.double(), atol=1e-9)


def test_perplexity_matches_the_models_own_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    blocks = [list(range(1, 21)), list(range(30, 40))]
    seen = []
    result = domain_perplexity(model, blocks, on_outputs=seen.append)
    with torch.no_grad():
        losses = [float(model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss) for b in blocks]
    reference = math.exp((losses[0] * 19 + losses[1] * 9) / 28)
    assert result["tokens"] == 28 and len(seen) == 2
    assert result["perplexity"] == pytest.approx(reference, rel=1e-5)


def test_parameter_counts_of_a_copy_upcycled_model(dense_dir, upcycled_dir):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    moe = AutoModelForCausalLM.from_pretrained(upcycled_dir, trust_remote_code=True)
    layers, hidden, num_experts, top_k = 2, 32, 4, 2
    ffn = sum(p.numel() for p in dense.model.layers[0].mlp.parameters())  # one dense FFN = one expert
    router = num_experts * hidden
    dense_total = sum(p.numel() for p in dense.parameters())
    counts = parameter_counts(moe)
    assert counts["total"] == dense_total + layers * ((num_experts - 1) * ffn + router)
    assert counts["active"] == dense_total + layers * ((top_k - 1) * ffn + router)
    assert counts["routed_experts"] == layers * num_experts * ffn
    dense_counts = parameter_counts(dense)
    assert dense_counts["total"] == dense_counts["active"] == dense_total


def test_domain_texts_and_data_arguments(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.py").write_text("beta")
    (tmp_path / "d" / "c.md").write_text("gamma")
    (tmp_path / "e.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_domain_texts(tmp_path / "a.txt") == ["alpha"]
    assert read_domain_texts(tmp_path / "d") == ["beta", "gamma"]
    assert read_domain_texts(tmp_path / "e.jsonl") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match='no "text" field'):
        read_domain_texts(tmp_path / "bad.jsonl")
    assert parse_data_args([f"x={tmp_path / 'a.txt'}"]) == {"x": tmp_path / "a.txt"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_data_args(["just-a-path"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        parse_data_args([f"x={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="given twice"):
        parse_data_args([f"x={tmp_path / 'a.txt'}", f"x={tmp_path / 'a.txt'}"])


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_analyze_writes_json_plots_and_report(dense_dir, upcycled_dir, tmp_path, capsys):
    code_dir = Path(sysconfig.get_paths()["stdlib"]) / "json"
    docs = local_tasks_dir() / "stdlib_docs_ppl.jsonl"
    out = tmp_path / "analysis"
    assert (
        analyze_cli.main(
            [
                str(upcycled_dir),
                "--data",
                f"code={code_dir}",
                "--data",
                f"docs={docs}",
                "--base",
                str(dense_dir),
                "--output",
                str(out),
                "--max-tokens",
                "384",
                "--new-tokens",
                "4",
                "--prompt-tokens",
                "16",
                "--cloze-items",
                "8",
            ]
        )
        == 0
    )
    analysis = json.loads((out / "analysis.json").read_text())
    model, base = analysis["results"]["model"], analysis["results"]["base"]
    assert analysis["unseen_domains"] == [UNSEEN_DOMAIN] and list(model["domains"]) == ["code", "docs", UNSEEN_DOMAIN]
    # The copy-upcycled model scores the unseen task's items exactly as its base does.
    assert model["cloze"]["items"] == base["cloze"]["items"] == 8 and model["cloze"]["acc"] == base["cloze"]["acc"]
    for domain in ("code", "docs", UNSEEN_DOMAIN):
        scores = model["domains"][domain]
        assert scores["tokens"] == base["domains"][domain]["tokens"] > 300
        # Copy upcycling keeps the dense function: same perplexity as the base.
        assert scores["perplexity"] == pytest.approx(base["domains"][domain]["perplexity"], rel=1e-4)
        routing = scores["routing"]
        assert routing["layers"] == [0, 1] and routing["top_k"] == 2
        for layer in routing["per_layer"].values():
            assert sum(layer["load_share"]) == pytest.approx(1.0)
            assert sum(layer["token_fraction"]) == pytest.approx(2.0)
            assert 0.0 <= layer["load_entropy_normalized"] <= 1.0 + 1e-9
            assert 1 / 4 <= layer["top1_agreement"] <= 1.0
        assert "routing" not in base["domains"][domain]
    for result in (model, base):
        assert result["speed"]["prefill_tokens_per_s"] > 0 and result["speed"]["decode_tokens_per_s"] > 0
    assert model["parameters"]["active"] < model["parameters"]["total"]
    for name in ("expert_load_code.png", "expert_load_docs.png", "expert_coactivation_code.png", "perplexity.png"):
        width, height = _png_size(out / name)
        assert width >= 400 and height >= 300
    report = (out / "report.md").read_text()
    for heading in (
        "## Parameters",
        "## Perplexity",
        "## Generation speed",
        "## Trade-off",
        "## Routing",
        "### code",
        "### docs",
        f"| {UNSEEN_DOMAIN} (unseen) |",
        "Cloze task on the unseen prose",
    ):
        assert heading in report
    for link in (
        "perplexity.png",
        "expert_load_code.png",
        "expert_load_docs.png",
        "expert_coactivation_docs.png",
        "analysis.json",
    ):
        assert f"({link})" in report and (out / link).is_file()
    assert "+0.00 %" in report or "-0.00 %" in report  # the perplexity change column
    assert "llama-moe analyze: 3 domain(s), 7 figure(s)" in capsys.readouterr().out


def _coselection(share: list[float], generator) -> list[list[float]]:
    """A symmetric top-2 co-selection matrix whose diagonal is each expert's token fraction."""
    fraction = 2 * torch.tensor(share, dtype=torch.float64)
    both = torch.rand(len(share), len(share), generator=generator, dtype=torch.float64)
    both = torch.minimum((both + both.T) / 2 * fraction[:, None] * fraction[None, :], fraction[:, None] / 2)
    both.fill_diagonal_(0.0)
    return (both + torch.diag(fraction)).tolist()


def _synthetic_analysis(layers: int, experts: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    per_layer = {}
    for layer in range(layers):
        share = torch.softmax(torch.randn(experts, generator=generator), 0).tolist()
        per_layer[str(layer)] = {
            "load_share": share,
            "token_fraction": [2 * s for s in share],
            "load_cv": 0.5,
            "load_entropy": 1.0,
            "load_entropy_normalized": 0.9,
            "top1_expert": 0,
            "top1_agreement": 0.3,
            "coselection": _coselection(share, generator),
        }
    routing = {
        "layers": list(range(layers)),
        "num_experts": experts,
        "top_k": 2,
        "tokens": 4096,
        "per_layer": per_layer,
    }
    params = {"total": 10**9, "active": 4 * 10**8, "routed_experts": 8 * 10**8, "embedding": 10**8}
    domain = {"perplexity": 12.5, "tokens": 4096, "routing": routing}
    return {
        "model": "some/moe",
        "base": "some/dense",
        "config": {
            "num_local_experts": experts,
            "num_experts_per_tok": 2,
            "moe_layers": list(range(layers)),
            "num_hidden_layers": layers,
        },
        "settings": {"max_tokens": 4096},
        "data": {"web": "web.txt", "code": "code/"},
        "results": {
            "model": {"parameters": params, "domains": {"web": domain, "code": dict(domain, perplexity=4.0)}},
            "base": {
                "parameters": dict(params, active=10**9, routed_experts=0),
                "domains": {"web": {"perplexity": 11.0, "tokens": 4096}, "code": {"perplexity": 3.5, "tokens": 4096}},
            },
        },
    }


def test_plots_and_report_come_from_the_json_alone(tmp_path):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(_synthetic_analysis(layers=32, experts=16)))
    figures = make_plots(path)
    assert sorted(figures) == ["coactivation_code", "coactivation_web", "load_code", "load_web", "perplexity"]
    width, height = _png_size(figures["load_web"])
    assert width > height * 0.8 and width >= 1000  # 32 layers across, 16 experts down
    report = write_report(path).read_text()
    assert "| web | 4096 | 12.5 | 11 | +13.64 % |" in report
    assert "## Generation speed" not in report  # no speed numbers in this JSON: no empty section
    assert "## Benchmarks" not in report
    moe = EvalRun(
        "moe", scores={"t": {"acc": 0.5, "acc_stderr": 0.1, "sample_len": 3}}, higher_is_better={"t": {"acc": True}}
    )
    write_results(tmp_path / "eval", moe, EvalRun("base", scores={"t": {"acc": 0.25}}))
    report = write_report(path, tmp_path / "eval" / "results.json").read_text()
    assert "| t | acc | 0.5000 | 0.2500 | +0.2500 |" in report and "(eval/results.md)" in report


def test_analyze_refuses_a_dense_model_and_a_missing_base_before_loading(dense_dir, upcycled_dir, tmp_path):
    data = ["--data", f"docs={local_tasks_dir() / 'stdlib_docs_ppl.jsonl'}", "--output", str(tmp_path)]
    with pytest.raises(ValueError, match="is not an MoE model.*--base"):
        analyze_cli.main([str(dense_dir)] + data)
    with pytest.raises(FileNotFoundError, match="not found"):
        analyze_cli.main([str(upcycled_dir), "--base", str(tmp_path / "missing")] + data)
    assert not (tmp_path / "analysis.json").exists()
