"""The quickstart report says in words when a result is bad: far from dense, degenerate generations, a benchmark
score at chance, collapsed routing; and says nothing alarming when the model is close to dense."""

import math

from llama_moe.evaluation.quickstart_report import collapsed_layers, findings, is_degenerate


def routing(shares_per_layer, top_k=2):
    def entropy(shares):
        return -sum(s * math.log(s) for s in shares if s > 0)

    return {
        "top_k": top_k,
        "num_experts": len(shares_per_layer[0]),
        "per_layer": {str(i): {"load_share": s, "load_entropy": entropy(s)} for i, s in enumerate(shares_per_layer)},
    }


def result(perplexity, generations, acc, stderr, shares=None):
    domain = {"perplexity": perplexity}
    if shares is not None:
        domain["routing"] = routing(shares)
    return {
        "domains": {"code": dict(domain)},
        "generations": generations,
        "lm_eval": {"llama_moe_docstring_mc": {"acc": acc, "acc_stderr": stderr}},
    }


BALANCED = [0.125] * 8
COLLAPSED = [0.5, 0.49, 0.01, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_degenerate_generations_and_collapse_detectors():
    assert is_degenerate("________________________") and is_degenerate("\n\n\n  ") and is_degenerate("")
    assert is_degenerate("ababab ab")
    assert not is_degenerate("    return fibonacci(n - 1) + fibonacci(n - 2)")
    assert collapsed_layers(routing([BALANCED, COLLAPSED, BALANCED])) == [1]


def test_findings_name_every_problem():
    results = {
        "base": result(15.0, {"p": "    return n"}, 0.40, 0.02),
        "upcycled": result(15.0 * 4000, {"p": "\n\n\n"}, 0.26, 0.02, [BALANCED, BALANCED]),
        "trained": result(15.0 * 80, {"p": "________"}, 0.27, 0.02, [COLLAPSED, BALANCED]),
    }
    text = "\n".join(findings(results))
    assert "4000.00x on code" in text and "far from dense quality" in text
    assert "80.00x on code" in text
    assert text.count("degenerate") == 2
    assert text.count("cannot be told from chance") == 2
    assert "collapsed in 1 of 2 MoE layers" in text and "layers [0]" in text


def test_findings_of_a_good_model_are_short_and_calm():
    results = {
        "base": result(15.0, {"p": "    return n"}, 0.40, 0.02),
        "upcycled": result(30.0, {"p": "    return n + 1"}, 0.38, 0.02, [BALANCED]),
        "trained": result(18.0, {"p": "    return n"}, 0.39, 0.02, [BALANCED]),
    }
    lines = findings(results)
    assert len(lines) == 2
    assert "1.20x on code" in lines[1] and "close to the dense model" in lines[1]
    assert "not yet at dense quality" in lines[0]
