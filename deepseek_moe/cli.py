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


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate

    prompt_ids = [int(token) for token in args.prompt_ids.split(",")] if args.prompt_ids else None
    return generate(args.model, args.prompt, prompt_ids, args.max_new_tokens, args.dtype, args.use_mtp, args.revision)


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    from .generate import DTYPES

    parser = subparsers.add_parser("generate", help="stream a greedy continuation from a local or Hub model")
    parser.add_argument("model", metavar="DIR_OR_REPO", help="checkpoint directory or Hub repo id")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text prompt (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, for checkpoints without a tokenizer")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    parser.add_argument("--revision", default=None, help="Hub revision")
    parser.add_argument("--use-mtp", action="store_true", help="self-speculative decoding with the MTP modules")
    parser.set_defaults(run=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-moe", description="DeepSeek mixture-of-experts models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info(subparsers)
    _add_demo(subparsers)
    _add_generate(subparsers)
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
