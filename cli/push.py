"""`llama-moe push`: check a model directory, complete its model card and upload it to the Hugging Face Hub.

Parses arguments and calls llama_moe.evaluation.hub; prints the plan for --dry-run. No upload logic here.
"""

import argparse

from llama_moe.evaluation.hub import push


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-moe push",
        description="Upload MODEL (weights, config with auto_map, remote code, tokenizer, model card) to REPO_ID "
        "after checking it: loads with trust_remote_code without llama-moe, no pickle files, Hub size limits, "
        "no access tokens in any file.",
    )
    parser.add_argument("model", help="model directory")
    parser.add_argument("repo_id", help="Hub repo id: NAME or ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--dry-run", action="store_true", help="run the checks and print what would be uploaded")
    parser.add_argument("--base-model", default=None, help="Hub id of the dense model, for the card's base_model")
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave matching files out (repeatable), e.g. --exclude 'checkpoint-*/*'",
    )
    parser.add_argument(
        "--skip-load-check", action="store_true", help="do not load the model in a clean subprocess before uploading"
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    plan, url = push(
        args.model,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
        base_model=args.base_model,
        exclude=args.exclude,
        load_check=not args.skip_load_check,
    )
    if args.dry_run:
        print(plan.describe())
        print("\n----- README.md (model card) -----")
        print(plan.card)
        print(f"llama-moe push: dry run, nothing uploaded ({len(plan.files)} file(s) checked for {args.repo_id}).")
        return 0
    for warning in plan.warnings:
        print(f"warning: {warning}")
    print(f"llama-moe push: uploaded {len(plan.files)} file(s) from {args.model} -> {url}")
    return 0
