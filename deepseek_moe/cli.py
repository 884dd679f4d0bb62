"""`deepseek-moe` command line. Each subcommand is one `_add_<name>` function that registers its parser and sets
`run` to the function doing the work, so new subcommands plug in without touching the others."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .dtypes import DTYPE_NAMES


def _info(args: argparse.Namespace) -> int:
    from .info import count_parameters, describe, kv_cache_bytes_per_token
    from .presets import load_config

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
    from .demo import keep_writes_inside, prepare_output_dir

    output_dir = prepare_output_dir(args.output_dir)
    keep_writes_inside(output_dir)  # before torch, transformers, datasets and matplotlib are imported
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .demo.run import run_demo

    return run_demo(output_dir, quick=args.quick, seed=args.seed, progress=not args.no_progress)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a small DeepSeek-V3-style model on the Python standard library's sources, on CPU, in minutes",
        description="Trains a tokenizer and a small V3-style model (MLA, fine-grained + shared experts, group-limited "
        "routing, auxiliary-loss-free balancing, MTP) on the standard library's own source files with the "
        "training code of `deepseek-moe train`, then measures held-out perplexity, generates Python code (greedy, "
        "sampled, MTP drafting), saves and reloads, fine-tunes with LoRA, exports, and plots. Downloads nothing; "
        "writes only under --output-dir. A few minutes on 2 idle CPU cores; --quick about a minute.",
    )
    parser.add_argument("--output-dir", default="demo-out", help="where everything is written (default demo-out)")
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (about a minute)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights, data order and sampling")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=_demo)


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate

    try:
        prompt_ids = [int(token) for token in args.prompt_ids.split(",")] if args.prompt_ids else None
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    return generate(
        args.model,
        args.prompt,
        prompt_ids,
        args.max_new_tokens,
        args.dtype,
        args.use_mtp,
        args.revision,
        args.tokenizer,
        args.draft_tokens,
        args.device_map,
        args.prepack,
    )


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="stream a greedy continuation from a local or Hub model")
    parser.add_argument("model", metavar="DIR_OR_REPO", help="checkpoint directory or Hub repo id")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text prompt (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, for checkpoints without a tokenizer")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or repo (default: the model's own)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    parser.add_argument("--revision", default=None, help="Hub revision")
    parser.add_argument(
        "--device-map",
        metavar="DEVICE",
        help="cpu, cuda, cuda:N, or auto/balanced/sequential to spread layers over GPUs and CPU "
        "(default: the first GPU if there is one, else the CPU)",
    )
    parser.add_argument(
        "--prepack",
        action="store_true",
        help="on the CPU in fp32 or bf16: decode over copies of the weights and the cache packed for oneDNN "
        "(prepack_cpu_weights: same tokens, faster steps, about twice the memory of the weights it copies)",
    )
    parser.add_argument(
        "--use-mtp",
        action="store_true",
        help="self-speculative decoding with the MTP modules (same tokens; acceptance reported on stderr)",
    )
    parser.add_argument(
        "--draft-tokens",
        type=int,
        metavar="N",
        help="with --use-mtp: the most tokens drafted per step (default: as many as pay, up to two more than the MTP "
        "modules; beyond them the last module runs again)",
    )
    parser.set_defaults(run=_generate)


def _convert(args: argparse.Namespace) -> int:
    from .conversion import convert_checkpoint, plan_conversion

    options = dict(
        target=args.to,
        dtype=args.dtype,
        drop_mtp=args.drop_mtp,
        mp=args.mp,
        max_shard_size=args.max_shard_size,
        config=args.config,
    )
    if args.dry_run:
        plan = plan_conversion(args.source, **options)
        for planned in plan.files:
            print(f"{planned.name}\t{len(planned.tensors)} tensors\t{planned.file_bytes} bytes")
        print(f"{plan.data_bytes} bytes, {len(plan.dropped)} MTP tensors dropped, {len(plan.copies)} files copied")
        return 0
    report = convert_checkpoint(
        args.source, args.output, verify=args.verify, overwrite=args.overwrite, progress=not args.no_progress, **options
    )
    checked = "" if report.logits_error is None else f", logits checked (relative error {report.logits_error:.2g})"
    print(
        f"wrote {report.output}: {len(report.files)} files, {report.total_bytes / 1e9:.3f} GB in {report.seconds:.1f} s"
        f"{', dropped ' + str(len(report.dropped)) + ' MTP tensors' if report.dropped else ''}"
        f"{', verified' if args.verify else ''}{checked}"
    )
    return 0


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert official DeepSeek checkpoints (bf16/FP8, HF or model-parallel layout) to ours and back",
        description="Streams one tensor at a time into a temporary directory next to OUTPUT, moved into place when "
        "complete; an interrupted run (Ctrl-C, SIGTERM, SIGKILL) resumes from its complete shards when the same "
        "command runs again. SOURCE is never written. Sources: a directory with model.safetensors, a "
        "model.safetensors.index.json, or DeepSeek's model{i}-mp{n}.safetensors files.",
    )
    parser.add_argument("source", help="checkpoint directory")
    parser.add_argument("output", help="directory to create")
    parser.add_argument(
        "--to",
        choices=("ours", "fp8", "mp"),
        default="ours",
        help="ours: plain weights (FP8 dequantized); fp8: DeepSeek's FP8 form with 128x128 block scales; "
        "mp: DeepSeek's inference-repo model-parallel files (MTP dropped, as its convert.py does)",
    )
    parser.add_argument("--dtype", help="bf16, fp16 or fp32 for plain weights (default: keep; FP8 becomes bf16)")
    parser.add_argument("--drop-mtp", action="store_true", help="leave out the multi-token-prediction layers")
    parser.add_argument("--mp", type=int, default=1, help="model-parallel ranks for --to mp")
    parser.add_argument("--max-shard-size", default="5GB", help="decimal units, e.g. 5GB or 100MB (default 5GB)")
    parser.add_argument("--config", help="config.json, its directory or a preset (default: SOURCE/config.json)")
    parser.add_argument("--verify", action="store_true", help="re-read the output and check it against the source")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT if it is an earlier conversion's output (refused if it holds other files)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the planned files and write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_convert)


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
        include=args.include,
        delete_stale=args.delete_stale,
    )
    return 0


def _add_upload(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upload",
        help="validate a model or LoRA adapter folder and publish it to the Hub with remote code and a model card",
        description="Checks the config, the weights and that the folder loads as remote code before sending anything; "
        "sends only the model's files (config, weights named by the index, tokenizer, chat template, generation "
        "config, plots, conversion.json, adapter files, a card, the model code); deletes remote weights the upload "
        "replaces in its last commit; uploads in several commits for large folders and skips files already on the "
        "Hub, so a re-run resumes.",
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
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the plan (with the remote files it would delete); write nothing",
    )
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    parser.add_argument("--base-model", help="base model for the card (default: from the folder, if it names one)")
    parser.add_argument("--license", help="license for the card (default: mit for V3, DeepSeek's license otherwise)")
    parser.add_argument("--regenerate-card", action="store_true", help="replace the folder's own README.md")
    parser.add_argument(
        "--max-commit-size", default="20GB", help="bytes per commit, HF-style units (default 20GB; decimal)"
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also send files matching PATTERN (a path in the folder, wildcards allowed; repeatable). Only the model's "
        "own files are sent otherwise; pickles (*.bin, *.pt, ...) only when PATTERN is their exact path",
    )
    parser.add_argument(
        "--delete-stale",
        action="store_true",
        help="delete every remote file the upload does not contain (by default only those that change what loads: "
        "other weights, stale shards, an old index, model code)",
    )
    parser.set_defaults(run=_upload)


def _train(args: argparse.Namespace) -> int:
    from .training.pretrain import load_train_arguments, train

    settings = {key: value for key, value in vars(args).items() if key not in ("command", "run", "config", "debug")}
    result = train(load_train_arguments(args.config, **settings))
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"trained {result.steps} steps ({result.tokens} tokens); model saved to {result.model_path}")
    if result.eval_perplexities:
        step, perplexity = max(result.eval_perplexities.items())
        print(f"evaluation perplexity at step {step}: {perplexity:.3f}")
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pre-train (or continue training) a model on text files with Accelerate",
        description="Settings come from --config (YAML or JSON, keys as below with underscores) and the flags, which "
        "win; defaults are DeepSeek-V3's (docs/TRAINING.md). Run as a plain process, under torchrun, or as "
        "`accelerate launch -m deepseek_moe.cli train ...`. A re-run with the same --output-dir resumes from the "
        "newest complete checkpoint.",
    )
    flag = parser.add_argument
    flag("--config", help="YAML or JSON file of settings")
    flag("--model", help="preset name, config.json, or saved model directory to continue from (default tiny-v3)")
    flag(
        "--config-overrides",
        type=json.loads,
        help="JSON object of config fields for a new model, e.g. '{\"num_hidden_layers\": 2}'",
    )
    flag("--data", nargs="+", help="text/JSONL/JSON/CSV/parquet files or directories, or one saved dataset directory")
    flag("--eval-data", nargs="+", help="evaluation files (default: --eval-holdout-rows packed rows of --data)")
    flag("--eval-holdout-rows", type=int, help="packed training rows held out for evaluation")
    flag("--text-field", help="column holding the text (default text)")
    flag("--text-sample-by", choices=("line", "paragraph", "document"), help="text files: what one document is")
    flag("--streaming", action="store_true", default=None, help="read the data lazily (no shuffling)")
    flag("--tokenizer", help="tokenizer directory or Hub name, or 'bytes' (built-in byte-level)")
    flag("--seq-length", type=int, help="tokens per packed row (default 4096)")
    flag("--global-batch-size", type=int, help="rows per optimizer step over all processes")
    flag("--micro-batch-size", type=int, help="rows per forward per process (default 1)")
    flag("--gradient-accumulation-steps", type=int, help="micro-batches per process per step (default: derived)")
    flag("--sync-each-batch", action="store_true", default=None, help="sync gradients on every micro-batch")
    flag("--max-steps", type=int, help="optimizer steps (default 1000)")
    flag("--learning-rate", type=float, help="peak learning rate (default 2.2e-4)")
    flag("--min-lr-ratio", type=float, help="cosine floor relative to the peak (default 0.1)")
    flag("--lr-schedule", choices=("cosine", "step", "constant"), help="after warm-up (default cosine)")
    flag("--warmup-steps", type=int, help="linear warm-up steps (default 2000)")
    flag("--adam-beta1", type=float, help="AdamW beta1 (default 0.9)")
    flag("--adam-beta2", type=float, help="AdamW beta2 (default 0.95)")
    flag("--adam-epsilon", type=float, help="AdamW epsilon (default 1e-8)")
    flag("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    flag("--max-grad-norm", type=float, help="gradient clipping norm (default 1.0)")
    flag("--bf16", action="store_true", default=None, help="bf16 mixed precision")
    flag("--fp8", choices=("none", "blockwise", "torchao"), help="FP8 training recipe (default none)")
    flag("--gradient-checkpointing", action="store_true", default=None, help="activation checkpointing")
    flag("--bias-update-speed", type=float, help="gamma of the V3 bias update (default: the config's)")
    flag("--bias-update-stop", type=float, help="fraction of the steps after which gamma is 0")
    flag("--mtp-loss-weight-early", type=float, help="MTP lambda before --mtp-switch (default 0.3)")
    flag("--mtp-loss-weight-late", type=float, help="MTP lambda after it (default 0.1)")
    flag("--mtp-switch", type=float, help="fraction of the steps where lambda switches (default 10/14.8)")
    flag("--fsdp", action="store_true", default=None, help="shard with FSDP2 (decoder layers as units)")
    flag("--ep-size", type=int, help="expert-parallel size")
    flag("--tp-size", type=int, help="tensor-parallel size")
    flag("--output-dir", help="run directory: checkpoints/, final/, logs (default runs/deepseek-moe)")
    flag("--seed", type=int, help="seed for weights and data order (default 42)")
    flag("--eval-every", type=int, help="steps between evaluations (default 0: at the end)")
    flag("--eval-batches", type=int, help="micro-batches per evaluation and process (default 0: all)")
    flag("--save-every", type=int, help="steps between checkpoints (default 0: none)")
    flag("--keep-checkpoints", type=int, help="checkpoints kept (default 2)")
    flag("--no-resume", dest="resume", action="store_false", default=None, help="ignore existing checkpoints")
    flag("--log-every", type=int, help="steps between TensorBoard records (default 1)")
    flag("--no-tensorboard", dest="tensorboard", action="store_false", default=None, help="no TensorBoard logs")
    flag("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    parser.set_defaults(run=_train)


def _finetune(args: argparse.Namespace) -> int:
    from .training.finetune import FinetuneArguments, finetune

    ignored = ("command", "run", "debug")
    settings = {key: value for key, value in vars(args).items() if key not in ignored and value is not None}
    result = finetune(FinetuneArguments(**settings))
    print(f"fine-tuned (train loss {result.train_loss:.4f}); saved to {result.model_path}")
    return 0


def _add_finetune(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune on chat (messages) or text data with transformers' Trainer, LoRA or full",
        description="Chat rows (a `messages` column) are rendered with the tokenizer's chat template and trained on "
        "the assistant turns only. LoRA adapts the attention projections, dense/shared MLPs and routed experts "
        "(never the router); the V3 correction bias stays frozen unless --update-bias.",
    )
    flag = parser.add_argument
    flag("model", help="saved model directory (a preset name builds a random model)")
    flag("--data", nargs="+", required=True, help="JSONL/JSON/CSV/parquet/text files or a saved dataset directory")
    flag("--eval-data", nargs="+", help="evaluation files")
    flag("--tokenizer", help="tokenizer directory or Hub name (default: the model's)")
    flag("--data-format", choices=("auto", "chat", "text"), help="default auto: chat when a messages column exists")
    flag("--max-length", type=int, help="tokens per example (default 2048)")
    flag("--method", choices=("lora", "full"), help="default lora")
    flag("--lora-r", type=int, help="LoRA rank (default 16)")
    flag("--lora-alpha", type=int, help="LoRA alpha (default 32)")
    flag("--lora-target-modules", nargs="+", help="module names to adapt (default: attention and MLP projections)")
    flag("--no-lora-experts", dest="lora_experts", action="store_false", default=None, help="leave routed experts")
    flag("--update-bias", action="store_true", default=None, help="let the V3 correction bias move under LoRA")
    flag("--output-dir", help="default runs/deepseek-moe-finetune; the result goes to OUTPUT_DIR/final")
    flag("--learning-rate", type=float, help="default 1e-4")
    flag("--num-train-epochs", type=float, help="default 1")
    flag("--max-steps", type=int, help="overrides epochs when > 0")
    flag("--per-device-train-batch-size", type=int, help="default 1")
    flag("--gradient-accumulation-steps", type=int, help="default 1")
    flag("--warmup-steps", type=int, help="default 0")
    flag("--lr-scheduler-type", help="transformers scheduler name (default cosine)")
    flag("--weight-decay", type=float, help="default 0")
    flag("--bf16", action="store_true", default=None, help="bf16 mixed precision")
    flag("--gradient-checkpointing", action="store_true", default=None, help="activation checkpointing")
    flag("--seed", type=int, help="default 42")
    flag("--logging-steps", type=int, help="default 10")
    flag("--save-steps", type=int, help="default 500")
    flag("--eval-steps", type=int, help="steps between evaluations")
    flag("--report-to", help="Trainer integrations, e.g. tensorboard (default none)")
    flag("--resume-from-checkpoint", help="a Trainer checkpoint directory to resume from")
    parser.set_defaults(run=_finetune)


def _merge(args: argparse.Namespace) -> int:
    from .training.finetune import merge_adapter

    print(f"merged model written to {merge_adapter(args.adapter, args.output, base_model=args.base_model)}")
    return 0


def _add_merge(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge", help="merge a LoRA adapter into its base model as a standalone checkpoint")
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter directory (from `deepseek-moe finetune`)")
    parser.add_argument("output", metavar="OUTPUT", help="directory to create")
    parser.add_argument("--base-model", help="base model (default: the one the adapter names)")
    parser.set_defaults(run=_merge)


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    parser = argparse.ArgumentParser(
        prog="deepseek-moe", description="DeepSeek mixture-of-experts models.", parents=[debug]
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info(subparsers)
    _add_demo(subparsers)
    _add_generate(subparsers)
    _add_convert(subparsers)
    _add_upload(subparsers)
    _add_train(subparsers)
    _add_finetune(subparsers)
    _add_merge(subparsers)
    for subparser in subparsers.choices.values():  # `--debug` also after the command (hub_upload.py passes it there)
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Every error is reported as one line on stderr with exit code 2 (argparse's code for usage
    errors) instead of a traceback, which `--debug` shows; an interruption (Ctrl-C, SIGTERM) exits with 130."""
    args = build_parser().parse_args(argv)
    if getattr(args, "debug", False):
        return args.run(args)
    try:
        return args.run(args)
    except KeyboardInterrupt as interruption:
        print(f"deepseek-moe {args.command}: {interruption or 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"deepseek-moe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug rather than bad input: still one line, the traceback on request
        message = " ".join(str(error).split())
        print(
            f"deepseek-moe {args.command}: error: unexpected {type(error).__name__}: {message} (re-run with --debug "
            "for the traceback)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
