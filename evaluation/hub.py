"""`llama-moe push` behind the CLI: check a model directory, write its model card, upload it with huggingface_hub.

Every check runs before anything is sent (pickles, sizes, secrets, remote code loading without llama-moe);
the network is touched only by HfApi.create_repo / create_branch / upload_folder, in `push` and nowhere else.
"""

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import filter_repo_objects

from llama_moe.conversion.atomic import TEMPORARY_FILE_PATTERN, atomic_write_text
from llama_moe.conversion.model_path import is_hub_id
from llama_moe.conversion.reader import safetensors_header
from llama_moe.modeling.parameters import shape_parameter_counts

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Hub rules (huggingface.co/docs/hub/storage-limits, repositories-recommendations): 50 GB per file at most,
# < 20 GB recommended; files over 10 MB are stored with LFS/Xet (huggingface_hub uploads them that way).
MAX_FILE_BYTES = 50 * 1000**3
RECOMMENDED_FILE_BYTES = 20 * 1000**3
LFS_THRESHOLD_BYTES = 10 * 1000**2
SCAN_WHOLE_FILE_BYTES = 50 * 1000**2  # bigger files: only their safetensors header is scanned for secrets
# Never uploaded: version-control and cache folders, bytecode, our own atomic-write temporaries.
DEFAULT_IGNORE = [
    ".git/*",
    "*/.git/*",
    ".cache/*",
    "*/.cache/*",
    "__pycache__/*",
    "*/__pycache__/*",
    "*.pyc",
    TEMPORARY_FILE_PATTERN,
    f"*/{TEMPORARY_FILE_PATTERN}",
    ".DS_Store",
    "*/.DS_Store",
]
SECRET_PATTERNS = {
    "Hugging Face token": rb"hf_[A-Za-z0-9]{30,}",
    "Hugging Face org API token": rb"api_org_[A-Za-z0-9]{30,}",
    "GitHub token": rb"gh[pousr]_[A-Za-z0-9]{36,}",
    "OpenAI-style API key": rb"sk-[A-Za-z0-9_-]{40,}",
    "AWS access key id": rb"AKIA[0-9A-Z]{16}",
}
CARD_TAGS = ["moe", "mixture-of-experts", "upcycling", "llama-moe"]
EVAL_START, EVAL_END = "<!-- llama-moe:evaluation:start -->", "<!-- llama-moe:evaluation:end -->"


@dataclass
class UploadPlan:
    """What `push` would send: the files (path, bytes, LFS or not), the card text, and what the checks found."""

    folder: Path
    repo_id: str
    files: list[tuple[str, int, bool]] = field(default_factory=list)
    card: str = ""
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    load_check: dict = field(default_factory=dict)

    def describe(self) -> str:
        lines = [
            f"Would upload {len(self.files)} file(s), {sum(s for _, s, _ in self.files) / 1e6:,.1f} MB, "
            f"from {self.folder} to https://huggingface.co/{self.repo_id}:"
        ]
        lines += [f"  {path}  ({size / 1e6:,.2f} MB{', LFS' if lfs else ''})" for path, size, lfs in self.files]
        if self.load_check:
            lines.append(f"Remote code check: {self.load_check.get('summary', self.load_check)}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- file checks


def list_files(folder: Path, exclude: list[str] | None = None) -> list[str]:
    """Relative paths (POSIX) of the files upload_folder would send, with huggingface_hub's pattern rules."""
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE + list(exclude or [])))


def _lfs_patterns(folder: Path) -> list[str] | None:
    attributes = folder / ".gitattributes"
    if not attributes.is_file():
        return None
    return [
        line.split()[0]
        for line in attributes.read_text().splitlines()
        if "filter=lfs" in line and line.strip() and not line.startswith("#")
    ]


def check_files(folder: Path, files: list[str]) -> tuple[list[str], list[str]]:
    """(problems, warnings) about pickles and file sizes."""
    problems, warnings = [], []
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        problems.append(
            f"pickle files {pickles} can run code when loaded: keep weights in safetensors "
            "(save_pretrained does by default) and delete these files, or leave them out with --exclude."
        )
    lfs_patterns = _lfs_patterns(folder)
    for name in files:
        size = (folder / name).stat().st_size
        if size > MAX_FILE_BYTES:
            problems.append(
                f"{name} is {size / 1e9:.1f} GB; the Hub refuses files over 50 GB: re-save with "
                "save_pretrained(..., max_shard_size='5GB')."
            )
        elif size > RECOMMENDED_FILE_BYTES:
            warnings.append(f"{name} is {size / 1e9:.1f} GB; the Hub recommends files under 20 GB (shard it).")
        if (
            size > LFS_THRESHOLD_BYTES
            and lfs_patterns is not None
            and not any(fnmatch(name, p) or fnmatch(Path(name).name, p) for p in lfs_patterns)
        ):
            problems.append(
                f"{name} is over 10 MB but the folder's .gitattributes does not track it with LFS: "
                f"add '{Path(name).suffix and '*' + Path(name).suffix or name} filter=lfs diff=lfs "
                "merge=lfs -text' to .gitattributes, or delete .gitattributes."
            )
    return problems, warnings


def _safetensors_header(path: Path) -> dict:
    try:
        return safetensors_header(path)[0]
    except ValueError as error:
        raise ValueError(
            f"{path.name} is not a readable safetensors file ({error}): re-save it with save_pretrained."
        ) from error


def scan_secrets(folder: Path, files: list[str]) -> list[str]:
    """Problems for every file holding something that looks like an access token (small files whole; for
    big files the safetensors header, where metadata strings live)."""
    found = []
    for name in files:
        path = folder / name
        size = path.stat().st_size
        if size <= SCAN_WHOLE_FILE_BYTES:
            data = path.read_bytes()
        elif name.endswith(".safetensors"):
            try:
                data = json.dumps(_safetensors_header(path)).encode()
            except ValueError as error:
                found.append(str(error))
                continue
        else:
            continue
        for kind, pattern in SECRET_PATTERNS.items():
            match = re.search(pattern, data)
            if match:
                shown = match.group()[:7].decode(errors="replace") + "..."
                found.append(
                    f"{name} contains what looks like a {kind} ({shown}): remove it (and revoke it) before uploading."
                )
    return found


# ----------------------------------------------------------------------------------------- checkpoint facts


def weight_facts(folder: Path) -> dict:
    """Tensor names, shapes and parameter counts from the safetensors headers (no weights read)."""
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, info in _safetensors_header(path).items():
            if name != "__metadata__":
                shapes[name] = info["shape"]
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    num_experts = config.get("num_local_experts") or config.get("num_experts")
    counts = shape_parameter_counts(shapes.items(), num_experts, config.get("num_experts_per_tok"))
    return {"shapes": shapes, **counts, "config": config}


_LOAD_CHECK = r'''
import importlib.abc, json, sys

class RefuseLlamaMoE(importlib.abc.MetaPathFinder):
    """Makes llama_moe unimportable: the checkpoint must carry all the code it needs."""
    def find_spec(self, name, path=None, target=None):
        if name == "llama_moe" or name.startswith("llama_moe."):
            raise ModuleNotFoundError(f"No module named {name!r} (refused: checking the checkpoint alone)")
        return None

sys.meta_path.insert(0, RefuseLlamaMoE())
folder, full, shapes_file = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
import torch
from transformers import AutoConfig, AutoModelForCausalLM

config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
report = {"config_class": f"{type(config).__module__}.{type(config).__name__}"}
if full:
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    report["missing"] = sorted(info.get("missing_keys", []))
    report["unexpected"] = sorted(info.get("unexpected_keys", []))
    report["mismatched"] = [str(m) for m in info.get("mismatched_keys", [])]
    vocab = model.get_input_embeddings().weight.shape[0]
    with torch.inference_mode():
        logits = model(input_ids=torch.arange(min(8, vocab))[None]).logits
    report["finite_logits"] = bool(torch.isfinite(logits).all())
else:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    saved = json.load(open(shapes_file))
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    report["missing"] = sorted(k for k in expected if k not in saved and k not in tied)
    report["unexpected"] = sorted(k for k in saved if k not in expected)
    report["mismatched"] = sorted(k for k in saved if k in expected and saved[k] != expected[k])
report["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
print("LLAMA_MOE_LOAD_CHECK " + json.dumps(report))
'''


def check_remote_code(folder: Path, full_load_max_bytes: int = 1_000_000_000, timeout: int = 900) -> dict:
    """Load the directory with trust_remote_code in a fresh Python where llama_moe cannot be imported.
    Small checkpoints are loaded fully and run on a few tokens; big ones are built on the meta device and
    their parameter names and shapes compared with the safetensors headers."""
    facts = weight_facts(folder)
    weight_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    full = weight_bytes <= full_load_max_bytes
    with tempfile.TemporaryDirectory(prefix="llama-moe-load-check-") as scratch:
        shapes_file = Path(scratch) / "shapes.json"
        shapes_file.write_text(json.dumps(facts["shapes"]))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(scratch) / "modules"), TRANSFORMERS_VERBOSITY="error")
        result = subprocess.run(
            [sys.executable, "-I", "-c", _LOAD_CHECK, str(folder.resolve()), "1" if full else "0", str(shapes_file)],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    marker = [line for line in result.stdout.splitlines() if line.startswith("LLAMA_MOE_LOAD_CHECK ")]
    if result.returncode != 0 or not marker:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise ValueError(
            f"{folder} does not load with trust_remote_code=True without llama-moe installed:\n{tail}\n"
            "Re-save it with save_pretrained from a model built by llama-moe (that copies the code "
            "files and writes auto_map into config.json)."
        )
    report = json.loads(marker[-1].split(" ", 1)[1])
    report["mode"] = "full load + forward" if full else "meta-device build vs safetensors headers"
    bad = {k: report[k] for k in ("missing", "unexpected", "mismatched") if report.get(k)}
    if bad or report.get("finite_logits") is False:
        non_finite = " (non-finite logits)" if report.get("finite_logits") is False else ""
        raise ValueError(
            f"{folder} loads with its remote code but its weights do not match the model: "
            f"{json.dumps(bad)[:600]}{non_finite}."
        )
    report["summary"] = f"{report['model_class']} ({report['mode']}): ok"
    return report


# ------------------------------------------------------------------------------------------------ the card


def _looks_like_hub_id(text: str | None) -> bool:
    return bool(text) and is_hub_id(text) and not os.path.exists(text)


def _evaluation_section(folder: Path) -> str:
    lines = []
    results = folder / "eval" / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        if "comparison" in data:
            lines += [
                f"lm-evaluation-harness, compared with the dense base `{data['base']['model']}`:",
                "",
                "| task | metric | this model | base | delta |",
                "|---|---|---:|---:|---:|",
            ]
            lines += [
                f"| {r['task']} | {r['metric']} | {r['moe']:.4f} | {r['base']:.4f} | {r['delta']:+.4f} |"
                for r in data["comparison"]
            ]
        else:
            lines += ["lm-evaluation-harness:", "", "| task | metric | value |", "|---|---|---:|"]
            for task, metrics in data["model"]["scores"].items():
                lines += [
                    f"| {task} | {m} | {v:.4f} |"
                    for m, v in metrics.items()
                    if "_stderr" not in m and m != "sample_len"
                ]
        lines += ["", "Full results: [eval/results.md](eval/results.md).", ""]
    analysis_file = folder / "analysis" / "analysis.json"
    if analysis_file.is_file():
        results = json.loads(analysis_file.read_text())["results"]
        base = results.get("base")
        lines += [
            "Perplexity per domain (`llama-moe analyze`):",
            "",
            "| domain | tokens | perplexity |" + (" dense base |" if base else ""),
            "|---|---:|---:|" + ("---:|" if base else ""),
        ]
        for domain, scores in results["model"]["domains"].items():
            row = f"| {domain} | {scores['tokens']} | {scores['perplexity']:.4g} |"
            lines.append(row + (f" {base['domains'][domain]['perplexity']:.4g} |" if base else ""))
        lines.append("")
    if (folder / "analysis" / "report.md").is_file():
        lines += [
            "Perplexity per domain, routing statistics (expert load heatmaps), parameter counts and speed: "
            "[analysis/report.md](analysis/report.md).",
            "",
        ]
    if not lines:
        return ""
    return "\n".join([EVAL_START, "## Evaluation", ""] + lines + [EVAL_END])


def _generated_body(folder: Path, facts: dict) -> str:
    config = facts["config"]
    name = folder.resolve().name
    remote = ", trust_remote_code=True" if "auto_map" in config else ""
    experts = config.get("num_local_experts") or config.get("num_experts")
    layers = config.get("moe_layers")
    return "\n".join(
        [
            f"# {name}",
            "",
            "A Mixture-of-Experts model upcycled from a dense Llama-architecture checkpoint with "
            "`llama-moe`: the dense feed-forward blocks became routed experts.",
            "",
            "| | |",
            "|---|---|",
            f"| architecture | `{config.get('model_type', '?')}` |",
            f"| experts per MoE layer | {experts} |",
            f"| top-k | {config.get('num_experts_per_tok')} |",
            f"| MoE layers | {len(layers) if layers is not None else config.get('num_hidden_layers')} of "
            f"{config.get('num_hidden_layers')} |",
            f"| parameters | {facts['total'] / 1e6:,.1f}M total, {facts['active'] / 1e6:,.1f}M active per token |",
            "",
            "## Usage",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("REPO_ID"{remote})',
            f'tokenizer = AutoTokenizer.from_pretrained("REPO_ID"{remote})',
            "```",
            "",
        ]
    )


def build_card(folder: Path, repo_id: str, base_model: str | None = None) -> tuple[str, list[str]]:
    """The README.md to upload: an existing card (from conversion) keeps its text and extra metadata; the Hub
    metadata is completed and the evaluation section (re)written. Returns (card text, warnings)."""
    facts = weight_facts(folder)
    readme = folder / "README.md"
    card = (
        ModelCard.load(readme)
        if readme.is_file()
        else ModelCard(f"---\nlibrary_name: transformers\n---\n{_generated_body(folder, facts)}")
    )
    data: ModelCardData = card.data
    warnings = []
    data.library_name = "transformers"
    data.pipeline_tag = "text-generation"
    tags = list(data.tags or [])
    wanted = CARD_TAGS + (["custom_code"] if "auto_map" in facts["config"] else [])
    data.tags = tags + [t for t in wanted if t not in tags]
    if base_model:
        data.base_model = base_model
    if not _looks_like_hub_id(data.base_model if isinstance(data.base_model, str) else None) and not isinstance(
        data.base_model, list
    ):
        data.base_model = None
        warnings.append(
            "no Hub id for base_model in the card: pass --base-model ORG/NAME so the Hub links the "
            "model to the dense model it was upcycled from."
        )
    # Usage snippets load the uploaded repo, whatever path the card was written with (upcycle, train, by hand).
    body = re.sub(r'from_pretrained\("[^"]*"', f'from_pretrained("{repo_id}"', card.text)
    section = _evaluation_section(folder)
    if EVAL_START in body and EVAL_END in body:
        start, end = body.index(EVAL_START), body.index(EVAL_END) + len(EVAL_END)
        body = body[:start] + section + body[end:]
    elif section:
        body = body.rstrip("\n") + "\n\n" + section + "\n"
    card.text = body
    text = str(card)
    return text if text.endswith("\n") else text + "\n", warnings


# ------------------------------------------------------------------------------------------------ the push


def plan_upload(
    folder: str | Path,
    repo_id: str,
    base_model: str | None = None,
    exclude: list[str] | None = None,
    load_check: bool = True,
) -> UploadPlan:
    """Run every check and build the card; raise ValueError listing all problems found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory: give the model folder to upload.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", repo_id):
        raise ValueError(f"REPO_ID {repo_id!r} is not a Hub repo id: write NAME or ORG/NAME.")
    plan = UploadPlan(folder=folder, repo_id=repo_id)
    files = list_files(folder, exclude)
    if not (folder / "config.json").is_file():
        plan.problems.append(f"{folder} has no config.json: push a model directory written by save_pretrained.")
    if not any(f.endswith(".safetensors") for f in files):
        plan.problems.append(f"{folder} has no .safetensors weights.")
    problems, warnings = check_files(folder, files)
    plan.problems += problems + scan_secrets(folder, files)
    plan.warnings += warnings
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    for module in {v.split(".")[0] for v in (config.get("auto_map") or {}).values() if isinstance(v, str)}:
        if f"{module}.py" not in files:
            plan.problems.append(f"config.json auto_map names {module}.py but the folder does not have it.")
    if plan.problems:
        raise ValueError("not uploading; fix these first:\n  - " + "\n  - ".join(plan.problems))
    if load_check:
        plan.load_check = check_remote_code(folder)
    plan.card, card_warnings = build_card(folder, repo_id, base_model)
    plan.warnings += card_warnings
    sizes = {name: (folder / name).stat().st_size for name in files}
    names = sorted(set(files) | {"README.md"})
    card_size = len(plan.card.encode())
    plan.files = [
        (n, sizes.get(n, card_size) if n != "README.md" else card_size, (sizes.get(n, 0) > LFS_THRESHOLD_BYTES))
        for n in names
    ]
    return plan


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    base_model: str | None = None,
    exclude: list[str] | None = None,
    load_check: bool = True,
) -> tuple[UploadPlan, str | None]:
    """Check, write the card into the folder, then create the repo (and branch) and upload; returns the plan
    and the commit URL (None for a dry run)."""
    token = get_token()
    if token is None and not dry_run:
        raise ValueError(
            "No Hugging Face token is configured: run `hf auth login` or set HF_TOKEN "
            "(or use --dry-run to see what would be uploaded)."
        )
    plan = plan_upload(folder, repo_id, base_model=base_model, exclude=exclude, load_check=load_check)
    if dry_run:
        return plan, None
    atomic_write_text(plan.folder / "README.md", plan.card)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, repo_type="model", exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if revision and revision != "main":
        api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(plan.folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload {plan.folder.resolve().name} with llama-moe",
        allow_patterns=[glob.escape(name) for name, _, _ in plan.files],
    )
    return plan, getattr(commit, "commit_url", None) or str(commit)
