"""`llama-moe push`: checks before upload, the model card, --dry-run, and the upload call with huggingface_hub
patched at the network boundary (HfApi.create_repo / create_branch / upload_folder)."""

import json
import shutil
from fnmatch import fnmatch

import huggingface_hub
import pytest
import yaml

from llama_moe.cli import push as push_cli
from llama_moe.evaluation import hub
from llama_moe.evaluation.lm_eval_runner import EvalRun, write_results

FAKE_TOKEN = "hf_" + "Ab3" * 12  # built at run time so this file itself holds no token-shaped string


@pytest.fixture
def model_dir(upcycled_dir, tmp_path):
    """A private copy of the copy-upcycled checkpoint (its README.md card was written by the converter), with
    lm-eval results and an analysis report as `llama-moe eval` / `analyze` leave them."""
    folder = tmp_path / "model"
    shutil.copytree(upcycled_dir, folder)
    run = EvalRun(
        model=str(folder),
        scores={"llama_moe_docstring_mc": {"acc": 0.25, "acc_stderr": 0.1}},
        higher_is_better={"llama_moe_docstring_mc": {"acc": True}},
        n_shot={"llama_moe_docstring_mc": 0},
    )
    write_results(folder / "eval", run)
    (folder / "analysis").mkdir()
    (folder / "analysis" / "report.md").write_text("# Analysis\n")
    domains = {
        "model": {"domains": {"code": {"perplexity": 12.34, "tokens": 512}}},
        "base": {"domains": {"code": {"perplexity": 12.3, "tokens": 512}}},
    }
    (folder / "analysis" / "analysis.json").write_text(json.dumps({"results": domains}))
    return folder


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_dry_run_prints_files_and_card_without_a_token(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    readme_before = (model_dir / "README.md").read_text()
    argv = [str(model_dir), "me/tiny-moe", "--dry-run", "--base-model", "HuggingFaceTB/SmolLM2-135M"]
    assert push_cli.main(argv) == 0
    out = capsys.readouterr().out
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_llama_moe.py",
        "configuration_llama_moe.py",
        "tokenizer.json",
        "README.md",
        "eval/results.json",
        "analysis/report.md",
    ):
        assert f"  {name}  (" in out
    assert "Remote code check: transformers_modules." in out and "(full load + forward): ok" in out
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in out and "dry run, nothing uploaded" in out
    assert (model_dir / "README.md").read_text() == readme_before  # a dry run changes nothing


def test_patched_upload_sends_the_checked_files_and_a_merged_card(model_dir, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = dict(kwargs, repo_id=repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = dict(kwargs, repo_id=repo_id)

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        calls["token"] = self.token
        calls["card"] = (model_dir / "README.md").read_text()
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc",
            commit_message="m",
            commit_description="",
            oid="abc",
        )

    (model_dir / ".cache").mkdir()
    (model_dir / ".cache" / "junk.lock").write_text("x")
    (model_dir / "__pycache__").mkdir()
    (model_dir / "__pycache__" / "x.pyc").write_bytes(b"\0")
    monkeypatch.setattr(hub, "get_token", lambda: FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    assert (
        push_cli.main(
            [
                str(model_dir),
                "me/tiny-moe",
                "--private",
                "--revision",
                "v1",
                "--commit-message",
                "first",
                "--base-model",
                "HuggingFaceTB/SmolLM2-135M",
            ]
        )
        == 0
    )
    assert calls["create_repo"]["repo_id"] == "me/tiny-moe" and calls["create_repo"]["private"] is True
    assert calls["create_branch"]["branch"] == "v1"
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/tiny-moe" and upload["revision"] == "v1" and upload["commit_message"] == "first"
    assert upload["folder_path"] == str(model_dir) and calls["token"] == FAKE_TOKEN
    on_disk = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    sent = [f for f in on_disk if any(fnmatch(f, pattern) for pattern in upload["allow_patterns"])]
    assert sent == sorted(
        [
            "README.md",
            "config.json",
            "configuration_llama_moe.py",
            "dropless_moe.py",
            "moe_ops.py",
            "triton_moe.py",
            "generation_config.json",
            "model.safetensors",
            "modeling_llama_moe.py",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "eval/results.json",
            "eval/results.md",
            "analysis/report.md",
            "analysis/analysis.json",
        ]
    )
    assert json.loads((model_dir / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]

    card = calls["card"]
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert {"moe", "custom_code", "upcycling"} <= set(meta["tags"])
    assert "upcycled to a Mixture of Experts (copy)" in card  # the converter's text is kept
    assert "| experts per MoE layer | 4 routed |" in card and "top-k | 2" in card
    assert "| llama_moe_docstring_mc | acc | 0.2500 |" in card and "analysis/report.md" in card
    assert "| code | 512 | 12.34 | 12.3 |" in card
    assert 'from_pretrained("me/tiny-moe", trust_remote_code=True)' in card
    # Pushing again replaces the evaluation section instead of appending a second one.
    hub_card, _ = hub.build_card(model_dir, "me/tiny-moe")
    assert hub_card.count(hub.EVAL_START) == 1 and _front_matter(hub_card)["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def test_no_token_is_a_clear_error(model_dir, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **k: pytest.fail("must not upload"))
    with pytest.raises(ValueError, match="No Hugging Face token.*hf auth login"):
        push_cli.main([str(model_dir), "me/tiny-moe"])


def test_checks_refuse_pickles_secrets_oversized_files_and_missing_code(model_dir, monkeypatch):
    (model_dir / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    (model_dir / "notes.txt").write_text(f"token = {FAKE_TOKEN}\n")
    with open(model_dir / "huge.safetensors", "wb") as handle:
        handle.truncate(hub.MAX_FILE_BYTES + 1)  # sparse: no disk used
    (model_dir / "modeling_llama_moe.py").unlink()
    with pytest.raises(ValueError) as error:
        hub.plan_upload(model_dir, "me/tiny-moe", load_check=False)
    message = str(error.value)
    assert "pickle files ['training_args.bin']" in message
    assert "notes.txt contains what looks like a Hugging Face token" in message and FAKE_TOKEN not in message
    assert "huge.safetensors is 50.0 GB; the Hub refuses files over 50 GB" in message
    assert "auto_map names modeling_llama_moe.py" in message


def test_large_file_not_tracked_by_a_local_gitattributes_is_refused(model_dir):
    (model_dir / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
    (model_dir / "big.json").write_bytes(b" " * (hub.LFS_THRESHOLD_BYTES + 1))
    problems, _ = hub.check_files(model_dir, hub.list_files(model_dir))
    assert any("big.json is over 10 MB" in p for p in problems)
    assert (model_dir / "model.safetensors").stat().st_size < hub.LFS_THRESHOLD_BYTES  # small files need no LFS
    assert len([p for p in problems if "over 10 MB" in p]) == 1
    (model_dir / ".gitattributes").write_text(
        "*.json filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    )
    assert hub.check_files(model_dir, hub.list_files(model_dir))[0] == []


def test_remote_code_check_runs_without_llama_moe(model_dir):
    report = hub.check_remote_code(model_dir, full_load_max_bytes=0)  # meta-device build vs safetensors headers
    assert report["model_class"].startswith("transformers_modules.") and report["missing"] == []
    modeling = model_dir / "modeling_llama_moe.py"
    modeling.write_text(
        "import llama_moe.modeling  # a checkpoint that secretly needs the package\n" + modeling.read_text()
    )
    with pytest.raises(ValueError, match="does not load with trust_remote_code=True without llama-moe installed"):
        hub.check_remote_code(model_dir)
