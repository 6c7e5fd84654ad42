"""Speed of the product's own model against its dense parent, where users run them: transformers (decode at batch 1
and 8, prefill) in float32 and bfloat16, one decode step at Llama-3-8B layer widths, and llama.cpp (text
generation and prompt processing at f32, Q8_0 and Q4_K_M) when its tools are given. Same run, alternating, ratios
MoE / dense of tokens per second. Measures only; asserts nothing.

    python benchmarks/product_speed.py --moe quickstart/train/final --dense quickstart/base
    python benchmarks/product_speed.py --parts 8b                       # the Llama-3-8B-width step alone
    python benchmarks/product_speed.py --parts llama.cpp --llama-cpp ~/llama.cpp/build/bin --gguf-dense dense.gguf

`--gguf-dense`: an f32 GGUF of the dense parent (for SmolLM2: `llama-quantize --allow-requantize
SmolLM2-135M-Instruct.Q4_1.gguf dense.gguf F32` gives the weights `quickstart/base` holds); the MoE's GGUF is written
with `llama-moe export --format gguf --outtype f32`, and both are quantized with llama.cpp's own `llama-quantize`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PARTS = ("transformers", "8b", "llama.cpp")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load(path: str, dtype: torch.dtype):
    from llama_moe.evaluation.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(path, dtype=str(dtype).removeprefix("torch."))
    return model.eval()


def decode_tokens_per_s(model, batch: int, prompt: int, new_tokens: int) -> float:
    """Tokens per second of single-token steps with a KV cache after a `prompt`-token prefill (not timed)."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(vocab, (batch, prompt), generator=generator)
    next_ids = torch.randint(vocab, (new_tokens, batch, 1), generator=generator)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt_ids, cache=cache, use_cache=True, logits_to_keep=1)
        start = time.perf_counter()
        for step in range(new_tokens):
            model(input_ids=next_ids[step], cache=cache, use_cache=True)
        return batch * new_tokens / (time.perf_counter() - start)


def prefill_tokens_per_s(model, tokens: int) -> float:
    ids = torch.randint(model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return tokens / (time.perf_counter() - start)


def alternate(models: dict, measure, repeats: int) -> dict[str, float]:
    """Median of `repeats` rounds, the models measured in turn within each round (A B A B ...)."""
    for model in models.values():
        measure(model)  # warm-up: allocator, caches, thread pools
    samples = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            samples[name].append(measure(model))
    return {name: statistics.median(values) for name, values in samples.items()}


def transformers_rows(args) -> list[dict]:
    rows = []
    for dtype in args.dtypes.split(","):
        models = {"dense": load(args.dense, getattr(torch, dtype)), "moe": load(args.moe, getattr(torch, dtype))}
        cases = [
            (f"decode, batch {batch}", lambda m, b=batch: decode_tokens_per_s(m, b, args.prompt, args.new_tokens))
            for batch in (1, 8)
        ]
        cases.append((f"prefill {args.prefill} tokens", lambda m: prefill_tokens_per_s(m, args.prefill)))
        for what, measure in cases:
            speed = alternate(models, measure, args.repeats)
            rows.append({"engine": "transformers", "precision": dtype, "what": what, **speed})
            print(rows[-1], flush=True)
        del models
    return rows


def eight_b_rows(args) -> list[dict]:
    """One decode step through `--layers-8b` decoder layers at Llama-3-8B widths (hidden 4096, FFN 14336, GQA 32/8),
    random weights: the dense FFN against carve's 50% shape (4 shared widths + top-4 of 12 routed, width 896)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_moe.modeling import LlamaMoEConfig, LlamaMoEForCausalLM

    common = dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers_8b,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=1024,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    rows = []
    for dtype in args.dtypes.split(","):
        torch.manual_seed(0)
        dense = LlamaForCausalLM(LlamaConfig(**common)).to(getattr(torch, dtype)).eval()
        moe = (
            LlamaMoEForCausalLM(
                LlamaMoEConfig(
                    **common,
                    num_local_experts=12,
                    num_experts_per_tok=4,
                    moe_intermediate_size=896,
                    shared_expert_intermediate_size=4 * 896,
                )
            )
            .to(getattr(torch, dtype))
            .eval()
        )
        speed = alternate(
            {"dense": dense, "moe": moe},
            lambda m: decode_tokens_per_s(m, 1, args.prompt, args.new_tokens),
            args.repeats,
        )
        rows.append(
            {
                "engine": "transformers",
                "precision": dtype,
                "what": f"decode step, Llama-3-8B widths, {args.layers_8b} layers, 50% active FFN",
                **speed,
            }
        )
        print(rows[-1], flush=True)
        del dense, moe
    return rows


def llama_bench(tool_dir: Path, gguf: Path, threads: int, repeats: int) -> dict[str, float]:
    out = subprocess.run(
        [
            str(tool_dir / "llama-bench"),
            "-m",
            str(gguf),
            "-p",
            "128",
            "-n",
            "64",
            "-t",
            str(threads),
            "-r",
            str(repeats),
            "-o",
            "json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    results = json.loads(out)
    speed = {}
    for result in results:
        kind = "prompt processing 128" if result["n_prompt"] else "text generation 64"
        speed[kind] = result["avg_ts"]
    return speed


def quantize(tool_dir: Path, source: Path, target: Path, kind: str) -> str:
    """llama.cpp's own quantizer; returns its note on tensors stored in another type than asked."""
    run = subprocess.run(
        [str(tool_dir / "llama-quantize"), "--allow-requantize", str(source), str(target), kind],
        check=True,
        capture_output=True,
        text=True,
    )
    return next((line.strip() for line in (run.stdout + run.stderr).splitlines() if "fallback" in line), "")


def llama_cpp_rows(args) -> list[dict]:
    tools, work = Path(args.llama_cpp), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    moe_f32 = work / "moe-f32.gguf"
    if not moe_f32.exists():
        subprocess.run(
            ["llama-moe", "export", args.moe, str(moe_f32), "--format", "gguf", "--outtype", "f32"], check=True
        )
    files = {"F32": {"dense": Path(args.gguf_dense), "moe": moe_f32}}
    notes = {}
    for kind in ("Q8_0", "Q4_K_M"):
        files[kind] = {}
        for name, source in files["F32"].items():
            target = work / f"{name}-{kind}.gguf"
            notes[(kind, name)] = quantize(tools, source, target, kind)
            files[kind][name] = target
    rows = []
    for kind, pair in files.items():
        speeds = {name: [] for name in pair}
        for _ in range(args.repeats_llama_cpp):  # alternate whole llama-bench runs
            for name, gguf in pair.items():
                speeds[name].append(llama_bench(tools, gguf, args.threads, 5))
        for what in ("text generation 64", "prompt processing 128"):
            row = {
                "engine": "llama.cpp",
                "precision": kind,
                "what": what,
                **{name: statistics.median(s[what] for s in runs) for name, runs in speeds.items()},
                "fallback": {name: notes.get((kind, name), "") for name in pair},
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| engine | precision | measurement | dense tok/s | MoE tok/s | MoE / dense |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['engine']} | {row['precision']} | {row['what']} | {row['dense']:.1f} | "
            f"{row['moe']:.1f} | **{row['moe'] / row['dense']:.2f}x** |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", default="quickstart/train/final", help="the MoE model (default: the quickstart's)")
    parser.add_argument("--dense", default="quickstart/base", help="its dense parent (default: the quickstart's)")
    parser.add_argument("--parts", default="transformers,8b", help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding (not timed)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds per measurement (median)")
    parser.add_argument("--layers-8b", type=int, default=2, help="decoder layers of the Llama-3-8B-width step")
    parser.add_argument("--llama-cpp", default=None, help="folder with llama.cpp's llama-bench and llama-quantize")
    parser.add_argument("--gguf-dense", default=None, help="f32 GGUF of the dense parent (llama.cpp part)")
    parser.add_argument("--work", default="runs/product_speed", help="where GGUF files are written")
    parser.add_argument("--repeats-llama-cpp", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    if "llama.cpp" in parts and not (args.llama_cpp and args.gguf_dense):
        parser.error("the llama.cpp part needs --llama-cpp (its tools' folder) and --gguf-dense")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    rows = []
    if "transformers" in parts:
        rows += transformers_rows(args)
    if "8b" in parts:
        rows += eight_b_rows(args)
    if "llama.cpp" in parts:
        rows += llama_cpp_rows(args)
    print(f"\n{cpu_name()}, {args.threads} threads, torch {torch.__version__}, python {sys.version.split()[0]}\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
