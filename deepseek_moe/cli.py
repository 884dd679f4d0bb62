"""`deepseek-moe` command line. Each subcommand is one `_add_<name>` function that registers its parser and sets
`run` to the function doing the work, so new subcommands plug in without touching the others."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .configuration_deepseek_moe import PRESETS
from .info import count_parameters, describe, kv_cache_bytes_per_token, load_config


def _info(args: argparse.Namespace) -> int:
    config = load_config(args.model)
    if args.json:
        report = {"parameters": count_parameters(config), "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config)}
        print(json.dumps(report, indent=2))
    else:
        print(describe(config))
    return 0


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="architecture summary, parameter counts and KV-cache size (nothing is allocated)"
    )
    parser.add_argument("model", metavar="PRESET_OR_DIR", help="a preset name or a directory with a config.json")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.set_defaults(run=_info)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # imports the model (and torch's kernels) only when needed

    return run_demo(args.preset, new_tokens=args.new_tokens, prompt_length=args.prompt_length, seed=args.seed)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="build a small preset model and generate from it")
    parser.add_argument("--preset", default="tiny-v3", choices=sorted(PRESETS), help="architecture (default tiny-v3)")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens to generate")
    parser.add_argument("--prompt-length", type=int, default=8, help="length of the random prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and prompt")
    parser.set_defaults(run=_demo)


def _upload(args: argparse.Namespace) -> int:
    from .hub import upload  # imports huggingface_hub only when needed

    upload(
        args.model_dir,
        args.repo_id,
        token=args.token,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
        base_model=args.base_model,
        license=args.license,
        regenerate_card=args.regenerate_card,
        max_commit_size=args.max_commit_size,
    )
    return 0


def _add_upload(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upload",
        help="validate a model or LoRA adapter folder and publish it to the Hub with remote code and a model card",
        description="Checks the config, the weights and that the folder loads as remote code before sending anything; "
        "uploads in several commits for large folders and skips files already on the Hub, so a re-run resumes.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a saved model (config.json) or adapter folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, e.g. user/my-model")
    parser.add_argument(
        "--private",
        action="store_true",
        default=None,
        help="create the repository as private (an existing one keeps its visibility)",
    )
    parser.add_argument(
        "--revision",
        help="branch to upload to (created if missing; default main), or refs/pr/N to add to an open pull request",
    )
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="commit title (several commits get ' (part i/n)')")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; send nothing")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    parser.add_argument("--base-model", help="base model for the card (default: from the folder, if it names one)")
    parser.add_argument("--license", help="license for the card (default: mit for V3, DeepSeek's license otherwise)")
    parser.add_argument("--regenerate-card", action="store_true", help="replace the folder's own README.md")
    parser.add_argument(
        "--max-commit-size", default="20GB", help="bytes per commit, HF-style units (default 20GB; decimal)"
    )
    parser.set_defaults(run=_upload)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-moe", description="DeepSeek mixture-of-experts models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info(subparsers)
    _add_demo(subparsers)
    _add_upload(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Bad input (unknown preset, missing directory, invalid config) is reported as one line on
    stderr with exit code 2, argparse's code for usage errors, instead of a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"deepseek-moe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
