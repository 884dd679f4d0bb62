"""The demo, step by step: corpus and tokenizer → a small V3-style model → held-out perplexity → pre-training with
`deepseek_moe.training.pretrain.train` (bias update on, then a shorter run with it off for comparison) → held-out
perplexity → completions (greedy, sampled, MTP drafting) → sharded save and Auto-class reload → LoRA fine-tune and
merge → official-format and FP8 export → plots → a summary table of every file written.

Call `keep_writes_inside(output_dir)` (package `__init__`) before importing this module."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..model import DeepseekMoeConfig, DeepseekMoeForCausalLM
from . import CACHE_DIRECTORY
from .corpus import function_chats, read_split, train_tokenizer, write_jsonl, write_jsonl_rows
from .plots import plot_expert_load, plot_load_cv, plot_losses

SUMMARY_FILE = "summary.json"
PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef ",
    "class Stack:\n    def __init__(self):\n",
)


@dataclass(frozen=True)
class DemoSize:
    """How much the demo does: data, tokenizer, model width and depth, steps."""

    train_bytes: int
    heldout_bytes: int
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    seq_length: int
    batch_size: int
    steps: int
    comparison_steps: int  # the run with the bias update off
    finetune_steps: int
    eval_rows: int
    new_tokens: int
    learning_rate: float = 3e-3
    bias_update_speed: float = 0.01


# Sized for a few minutes (full) and about a minute (quick) on two idle CPU cores.
FULL = DemoSize(
    train_bytes=4_000_000,
    heldout_bytes=300_000,
    vocab_size=4096,
    hidden_size=192,
    num_hidden_layers=4,
    seq_length=256,
    batch_size=8,
    steps=300,
    comparison_steps=100,
    finetune_steps=30,
    eval_rows=48,
    new_tokens=48,
)
QUICK = DemoSize(
    train_bytes=800_000,
    heldout_bytes=120_000,
    vocab_size=1024,
    hidden_size=64,
    num_hidden_layers=3,
    seq_length=128,
    batch_size=8,
    steps=120,
    comparison_steps=60,
    finetune_steps=10,
    eval_rows=16,
    new_tokens=24,
)


def demo_config(size: DemoSize, vocab_size: int, tokenizer) -> DeepseekMoeConfig:
    """A DeepSeek-V3 layout at laptop scale: MLA with q/kv low-rank projections and the latent cache, one dense layer
    then fine-grained MoE layers (16 routed experts in 4 groups, top-2 groups, top-4 experts, 1 shared expert,
    sigmoid scores with the auxiliary-loss-free correction bias), and one MTP module."""
    h = size.hidden_size
    return DeepseekMoeConfig(
        vocab_size=vocab_size,
        hidden_size=h,
        intermediate_size=2 * h,
        moe_intermediate_size=h // 4,
        num_hidden_layers=size.num_hidden_layers,
        num_nextn_predict_layers=1,
        num_attention_heads=4,
        q_lora_rank=h // 2,
        kv_lora_rank=h // 4,
        qk_nope_head_dim=h // 8,
        qk_rope_head_dim=h // 16,
        v_head_dim=h // 8,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        max_position_embeddings=4 * size.seq_length,
        bias_update_speed=size.bias_update_speed,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@dataclass
class DemoReport:
    """Everything the demo measured, written to `summary.json` (the test reads it)."""

    seed: int
    quick: bool
    machine: dict[str, Any]
    size: dict[str, Any]
    parameters: dict[str, int] = field(default_factory=dict)
    heldout_files: list[str] = field(default_factory=list)
    heldout_tokens: int = 0
    perplexity: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    mtp_equals_greedy: bool | None = None
    reload_logits_equal: bool | None = None
    official_export_max_relative_error: float | None = None
    finetune: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time: what the run costs on an idle machine with one thread


class Demo:
    """Runs the stages in order; each stage records its time and the paths it wrote into the report."""

    def __init__(self, output_dir: Path, size: DemoSize, seed: int, quick: bool, progress: bool) -> None:
        self.out = output_dir
        self.size = size
        self.seed = seed
        self.progress = progress
        self.report = DemoReport(seed=seed, quick=quick, machine=machine_description(), size=asdict(size))

    def stage(self, name: str, work: Callable[[], Any]) -> Any:
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        result = work()
        self.report.stage_seconds[name] = round(time.perf_counter() - started, 2)
        return result

    def wrote(self, label: str, path: Path) -> Path:
        self.report.files[label] = str(path.relative_to(self.out))
        return path

    # ------------------------------------------------------------------------------------------------ data

    def prepare_data(self):
        size, data = self.size, self.out / "data"
        data.mkdir(exist_ok=True)
        self.train_files = train_files = read_split(size.train_bytes, held_out=False)
        self.heldout_files = heldout_files = read_split(size.heldout_bytes, held_out=True)
        write_jsonl(train_files, self.wrote("training corpus (stdlib files)", data / "train.jsonl"))
        write_jsonl(heldout_files, self.wrote("held-out corpus (other stdlib files)", data / "heldout.jsonl"))
        tokenizer = train_tokenizer(train_files, size.vocab_size, self.out / "tokenizer")
        self.wrote("byte-level BPE tokenizer", self.out / "tokenizer")
        self.report.heldout_files = [source.path for source in heldout_files]
        train_mb = sum(len(f.text.encode()) for f in train_files) / 1e6
        print(
            f"{len(train_files)} training files ({train_mb:.1f} MB), {len(heldout_files)} held-out files; "
            f"tokenizer: {len(tokenizer)} tokens"
        )
        return tokenizer

    def heldout_batches(self, tokenizer) -> list[dict[str, torch.Tensor]]:
        """The first `eval_rows` packed rows of the held-out files, as the training code packs them."""
        from ..training.data import collate_packed, load_documents, pack_dataset

        rows = pack_dataset(load_documents([str(self.out / "data" / "heldout.jsonl")]), tokenizer, self.size.seq_length)
        count = min(self.size.eval_rows, len(rows))
        batches = [
            collate_packed([rows[i] for i in range(start, min(start + 8, count))]) for start in range(0, count, 8)
        ]
        self.report.heldout_tokens = int(sum(batch["labels"][:, 1:].ne(-100).sum() for batch in batches))
        return batches

    # ------------------------------------------------------------------------------------------------ model

    def new_model(self, tokenizer) -> DeepseekMoeForCausalLM:
        torch.manual_seed(self.seed)
        config = demo_config(self.size, len(tokenizer), tokenizer)
        return DeepseekMoeForCausalLM(config).float()

    def describe(self, model: DeepseekMoeForCausalLM) -> None:
        from ..info import count_parameters

        counts = count_parameters(model.config)
        self.report.parameters = {key: int(value) for key, value in counts.items() if isinstance(value, (int, float))}
        c = model.config
        print(
            f"model: {c.num_hidden_layers} layers ({c.first_k_dense_replace} dense), MLA (q rank {c.q_lora_rank}, "
            f"kv rank {c.kv_lora_rank}), {c.n_routed_experts} routed experts in {c.n_group} groups (top-"
            f"{c.topk_group} groups, top-{c.num_experts_per_tok} experts) + {c.n_shared_experts} shared, "
            f"{c.topk_method}/{c.scoring_func}, {c.num_nextn_predict_layers} MTP module; "
            + ", ".join(f"{key} {value / 1e6:.2f} M" for key, value in self.report.parameters.items())
        )

    # ------------------------------------------------------------------------------------------------ training

    def train(self, model, tokenizer, steps: int, gamma: float, name: str) -> tuple[Any, list]:
        """`deepseek-moe train`'s own loop (`train()`), recording every optimizer step."""
        from ..training.pretrain import TrainArguments, train

        size = self.size
        args = TrainArguments(
            model=name,
            data=[str(self.out / "data" / "train.jsonl")],
            seq_length=size.seq_length,
            micro_batch_size=size.batch_size,
            max_steps=steps,
            learning_rate=size.learning_rate,
            warmup_steps=max(1, steps // 20),
            bias_update_speed=gamma,
            bias_update_stop=1.0,
            output_dir=str(self.out / name),
            seed=self.seed,
            resume=False,
            tensorboard=False,
            progress=self.progress,
        )
        records: list = []
        result = train(args, model=model, tokenizer=tokenizer, on_step=records.append)
        return result, records

    # ------------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def perplexity(self, model, batches) -> float:
        """exp(mean next-token cross-entropy) over the held-out rows; document starts are not predicted."""
        model.eval()
        total, count = 0.0, 0
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
            targets = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += int(targets.ne(-100).sum())
        return math.exp(total / count)

    def generate(self, model, input_ids: torch.Tensor, **options) -> tuple[Any, float]:
        """`generate` for `new_tokens` tokens (by default no early stop at EOS, so every mode emits as many), and its
        time."""
        options.setdefault("eos_token_id", None)
        started = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=self.size.new_tokens, **options)
        return output, time.perf_counter() - started

    @torch.no_grad()
    def samples(self, model, tokenizer) -> None:
        """Greedy, sampled and MTP-drafted completions; the MTP output must equal greedy token for token."""
        model.eval()
        lines, all_equal = [], True
        for index, prompt in enumerate(PROMPTS):
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
            greedy, greedy_seconds = self.generate(model, input_ids, do_sample=False)
            mtp, mtp_seconds = self.generate(model, input_ids, use_mtp=True, return_dict_in_generate=True)
            torch.manual_seed(self.seed + index)
            sampled, sampled_seconds = self.generate(model, input_ids, do_sample=True, temperature=0.8, top_k=50)
            equal = torch.equal(mtp.sequences, greedy)
            all_equal &= equal
            new = self.size.new_tokens
            record = {
                "prompt": prompt,
                "greedy": tokenizer.decode(greedy[0, input_ids.shape[1] :]),
                "sampled": tokenizer.decode(sampled[0, input_ids.shape[1] :]),
                "mtp_equals_greedy": equal,
                "mtp_acceptance_rate": mtp.acceptance_rate,
                "tokens_per_second": {
                    "greedy": new / greedy_seconds,
                    "greedy_mtp": new / mtp_seconds,
                    "sampled": new / sampled_seconds,
                },
            }
            self.report.samples.append(record)
            speeds = record["tokens_per_second"]
            lines += [
                f"### prompt {index + 1}: `{prompt!r}`",
                f"greedy ({speeds['greedy']:.0f} tokens/s):\n```python\n{prompt}{record['greedy']}\n```",
                f"greedy with MTP drafting ({speeds['greedy_mtp']:.0f} tokens/s, acceptance "
                f"{mtp.acceptance_rate:.0%}, {'same tokens as greedy' if equal else 'DIFFERS from greedy'})",
                f"sampled (temperature 0.8, top-k 50; {speeds['sampled']:.0f} tokens/s):\n"
                f"```python\n{prompt}{record['sampled']}\n```",
                "",
            ]
            print(
                f"prompt {prompt!r}\n  greedy : {record['greedy']!r}\n  sampled: {record['sampled']!r}\n"
                f"  MTP = greedy: {equal}, acceptance {mtp.acceptance_rate:.0%}, tokens/s greedy "
                f"{speeds['greedy']:.0f} / MTP {speeds['greedy_mtp']:.0f} / sampled {speeds['sampled']:.0f}"
            )
        self.report.mtp_equals_greedy = all_equal
        path = self.wrote("sample completions", self.out / "samples.md")
        path.write_text("# Completions after pre-training\n\n" + "\n".join(lines))

    # ------------------------------------------------------------------------------------------------ save/load

    def save_and_reload(self, model, tokenizer, batches) -> Path:
        """Sharded safetensors (about four shards), reloaded through `AutoModelForCausalLM`: same logits exactly."""
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        model_dir = self.wrote("trained model (sharded safetensors + tokenizer)", self.out / "model")
        shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) // 4
        model.save_pretrained(model_dir, max_shard_size=max(shard_bytes, 100_000))
        tokenizer.save_pretrained(model_dir)
        reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        model.eval()
        batch = {key: value[:2] for key, value in batches[0].items()}
        with torch.no_grad():
            expected = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            actual = reloaded(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        self.report.reload_logits_equal = bool(torch.equal(expected, actual))
        checks = self.wrote("logits of the in-memory model (for checking the reload)", self.out / "checks.safetensors")
        save_file(
            {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "logits": expected.contiguous()},
            checks,
        )
        shards = sorted(path.name for path in model_dir.glob("*.safetensors"))
        print(
            f"saved {len(shards)} shards to {model_dir}; {type(reloaded).__name__} via AutoModelForCausalLM: "
            f"logits {'identical' if self.report.reload_logits_equal else 'DIFFERENT'}"
        )
        return model_dir

    # ------------------------------------------------------------------------------------------------ fine-tune

    def finetune(self, model_dir: Path, tokenizer) -> None:
        """LoRA on chat examples made from the library's own functions (request: signature and docstring summary;
        answer: the source) with `deepseek-moe finetune`'s `finetune()`, merged into a standalone checkpoint by
        `merge_adapter`; the assistant-token perplexity on held-out files' functions before and after."""
        from transformers import AutoModelForCausalLM

        from ..training.finetune import FinetuneArguments, finetune, merge_adapter, tokenize_chat

        size, data = self.size, self.out / "data"
        max_chars = 3 * size.seq_length  # about one row of tokens
        train_chats = function_chats(self.train_files, max_chars)
        heldout_chats = function_chats(self.heldout_files, max_chars)[: size.eval_rows]
        chat_file = self.wrote("fine-tuning chats (functions of the training files)", data / "chat.jsonl")
        write_jsonl_rows(train_chats, chat_file)
        examples = [tokenize_chat(tokenizer, chat["messages"], size.seq_length) for chat in heldout_chats]
        base = AutoModelForCausalLM.from_pretrained(model_dir).float()
        before = chat_perplexity(base, examples)
        args = FinetuneArguments(
            model=str(model_dir),
            data=[str(data / "chat.jsonl")],
            max_length=size.seq_length,
            method="lora",
            lora_r=8,
            lora_alpha=16,
            output_dir=str(self.out / "finetune"),
            learning_rate=2e-3,
            max_steps=size.finetune_steps,
            per_device_train_batch_size=4,
            warmup_steps=1,
            logging_steps=size.finetune_steps,  # one log line
            save_steps=10 * size.finetune_steps,  # no intermediate checkpoints
            seed=self.seed,
            trainer_overrides={"disable_tqdm": not self.progress},
        )
        result = finetune(args, model=base, tokenizer=tokenizer)
        self.wrote("LoRA adapter", Path(result.model_path))
        merged_dir = self.wrote("base model with the LoRA adapter merged in", self.out / "model-lora-merged")
        merge_adapter(result.model_path, merged_dir, base_model=str(model_dir))
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).float()
        after = chat_perplexity(merged, examples)
        request = heldout_chats[0]["messages"][:1]
        chat_prompt = {"add_generation_prompt": True, "return_dict": True, "return_tensors": "pt"}
        prompt = tokenizer.apply_chat_template(request, **chat_prompt)
        prompt_ids = prompt["input_ids"]
        reply, _ = self.generate(merged.eval(), prompt_ids, do_sample=False, eos_token_id=tokenizer.eos_token_id)
        self.report.finetune = {
            "steps": size.finetune_steps,
            "train_examples": len(train_chats),
            "heldout_examples": len(examples),
            "heldout_answer_perplexity": {"base": before, "merged": after},
            "request": request[0]["content"],
            "reply": tokenizer.decode(reply[0, prompt_ids.shape[1] :], skip_special_tokens=True),
            "description": f"{size.finetune_steps} steps on {len(train_chats)} chats; held-out answer perplexity "
            f"{before:.1f} → {after:.1f} (merged)",
        }
        print(
            f"LoRA: held-out answer perplexity {before:.1f} (base) → {after:.1f} (merged)\n"
            f"request: {request[0]['content']}\nreply (merged model, greedy): {self.report.finetune['reply']!r}"
        )

    # ------------------------------------------------------------------------------------------------ export

    def export_official(self, model, batches) -> None:
        """DeepSeek's own config.json (`model_type` deepseek_v3), loaded back by transformers' built-in
        `DeepseekV3ForCausalLM`: the same logits as our model (its MTP weights are reported unexpected there)."""
        from transformers import DeepseekV3ForCausalLM
        from transformers.utils import logging

        official_dir = self.wrote(
            "official-format export (transformers' built-in, vLLM, SGLang)", self.out / "model-official"
        )
        model.save_pretrained(official_dir, official_format=True)
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the load report lists the MTP keys the built-in class does not have
        built_in = DeepseekV3ForCausalLM.from_pretrained(official_dir, dtype=torch.float32).eval()
        logging.set_verbosity(verbosity)
        input_ids = batches[0]["input_ids"][:2]
        with torch.no_grad():
            ours, theirs = model(input_ids).logits, built_in(input_ids).logits
        error = ((theirs - ours).abs().max() / ours.abs().max()).item()
        self.report.official_export_max_relative_error = error
        print(f"official format: transformers' DeepseekV3ForCausalLM, same logits (max relative error {error:.1e})")

    def export_fp8(self, model_dir: Path, batches) -> None:
        """DeepSeek's FP8 checkpoint form (128×128 block scales), loaded back (dequantized) for its perplexity."""
        from ..conversion import convert_checkpoint

        fp8_dir = self.wrote("FP8 export (DeepSeek's block-scaled form)", self.out / "model-fp8")
        convert_checkpoint(str(model_dir), str(fp8_dir), target="fp8", overwrite=True, progress=False)
        fp8_model = DeepseekMoeForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32)
        self.report.perplexity["FP8 export"] = self.perplexity(fp8_model, batches)
        print(f"FP8 export: held-out perplexity {self.report.perplexity['FP8 export']:.2f}")

    # ------------------------------------------------------------------------------------------------ summary

    def plots(self, main_records, comparison_records) -> None:
        plot_losses(main_records, self.report.perplexity, self.wrote("loss curve", self.out / "loss.png"))
        plot_expert_load(main_records, self.wrote("expert load per layer over steps", self.out / "expert_load.png"))
        gamma = self.size.bias_update_speed
        runs = {f"bias update on (γ = {gamma:g})": main_records, "bias update off (γ = 0)": comparison_records}
        plot_load_cv(runs, self.wrote("load CV with and without the bias update", self.out / "load_cv.png"))

    def finish(self, started: float) -> None:
        self.report.seconds = round(time.perf_counter() - started, 1)
        self.report.cpu_seconds = round(time.process_time(), 1)
        self.report.machine["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        self.wrote("this summary (JSON)", self.out / SUMMARY_FILE)
        self.wrote("caches of the libraries (Hugging Face datasets, matplotlib)", self.out / CACHE_DIRECTORY)
        (self.out / SUMMARY_FILE).write_text(json.dumps(asdict(self.report), indent=2, default=str))
        print(summary_table(self.report, self.out))


@torch.no_grad()
def chat_perplexity(model, examples: list[dict[str, list[int]]]) -> float:
    """exp(mean cross-entropy) over the assistant tokens of tokenized chats (labels -100 elsewhere)."""
    model.eval()
    total, count = 0.0, 0
    for example in examples:
        input_ids = torch.tensor([example["input_ids"]])
        targets = torch.tensor(example["labels"][1:])
        logits = model(input_ids=input_ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        count += int(targets.ne(-100).sum())
    return math.exp(total / count)


def quiet_progress_bars() -> None:
    import datasets
    from transformers.utils import logging

    datasets.disable_progress_bars()
    logging.disable_progress_bar()


def machine_description() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def summary_table(report: DemoReport, out: Path) -> str:
    """The closing table: measurements, then every path written with its size."""
    rows = [("held-out perplexity", ", ".join(f"{k} {v:.2f}" for k, v in report.perplexity.items()))]
    training = report.training
    rows.append(
        (
            "pre-training",
            f"{training['steps']} steps, {training['tokens'] / 1e6:.2f} M tokens, {training['seconds']:.0f} s, "
            f"loss {training['first_loss']:.2f} → {training['final_loss']:.2f}",
        )
    )
    first, last = training["late_steps"]
    cv = ", ".join(f"{k} {v:.3f}" for k, v in training["late_load_cv"].items())
    rows.append((f"load CV, steps {first}-{last}", cv))
    acceptance = [s["mtp_acceptance_rate"] for s in report.samples]
    speeds = [s["tokens_per_second"] for s in report.samples]
    rows.append(
        (
            "decoding (mean over prompts)",
            f"greedy {_mean(s['greedy'] for s in speeds):.0f} tok/s, MTP drafting "
            f"{_mean(s['greedy_mtp'] for s in speeds):.0f} tok/s (acceptance {_mean(acceptance):.0%}, "
            f"{'same tokens as greedy' if report.mtp_equals_greedy else 'DIFFERS from greedy'}), "
            f"sampled {_mean(s['sampled'] for s in speeds):.0f} tok/s",
        )
    )
    rows.append(("reload via AutoModelForCausalLM", "identical logits" if report.reload_logits_equal else "DIFFERENT"))
    if report.official_export_max_relative_error is not None:
        error = report.official_export_max_relative_error
        rows.append(("official format in transformers' built-in", f"same logits (max relative error {error:.1e})"))
    if report.finetune:
        rows.append(("LoRA fine-tune", report.finetune["description"]))
    machine = report.machine
    load = machine["load_average"]
    rows.append(
        (
            "run time",
            f"{report.seconds:.0f} s wall, {report.cpu_seconds:.0f} s CPU, {machine['torch_threads']} torch threads, "
            f"{machine['cpu_count']} CPUs ({machine['processor']})" + (f", load average {load[0]:.1f}" if load else ""),
        )
    )
    rows.append(("", ""))
    for label, relative in report.files.items():
        rows.append((relative, f"{label} ({_size(out / relative)})"))
    width = max(len(left) for left, _ in rows)
    return "\n".join(["", "== summary"] + [f"{left:<{width}}  {right}" for left, right in rows])


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _size(path: Path) -> str:
    if not path.exists():
        return "missing"
    total = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{total / 1e6:.2f} MB" if total >= 100_000 else f"{total / 1e3:.1f} kB"


def remove_previous_outputs(out: Path) -> None:
    """Delete what an earlier demo run listed in its summary (only those paths, never the caches, which this run
    already uses), so that no stale shard remains."""
    summary = out / SUMMARY_FILE
    if not summary.exists():
        return
    for relative in json.loads(summary.read_text()).get("files", {}).values():
        path = (out / relative).resolve()
        if path == out or out not in path.parents or path == out / CACHE_DIRECTORY:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run_demo(output_dir: str | os.PathLike = "demo-out", quick: bool = False, seed: int = 0, progress: bool = True):
    """The whole demo; returns 0 when every check passed (perplexity improved, reload exact, MTP = greedy)."""
    started = time.perf_counter()
    out = Path(output_dir).resolve()
    remove_previous_outputs(out)
    size = QUICK if quick else FULL
    demo = Demo(out, size, seed, quick, progress)
    torch.manual_seed(seed)
    if not progress:
        quiet_progress_bars()

    tokenizer = demo.stage("corpus and tokenizer", demo.prepare_data)
    batches = demo.stage("held-out rows", lambda: demo.heldout_batches(tokenizer))
    model = demo.new_model(tokenizer)
    demo.describe(model)
    demo.report.perplexity["before"] = demo.stage("perplexity before training", lambda: demo.perplexity(model, batches))
    print(f"held-out perplexity before training: {demo.report.perplexity['before']:.1f}")

    result, records = demo.stage(
        "pre-training (bias update on)",
        lambda: demo.train(model, tokenizer, size.steps, size.bias_update_speed, "train"),
    )
    demo.wrote("pre-training run (train_args.json, final model)", Path(result.output_dir))
    comparison_model = demo.new_model(tokenizer)  # the same initial weights
    _, comparison = demo.stage(
        "pre-training, bias update off (comparison)",
        lambda: demo.train(comparison_model, tokenizer, size.comparison_steps, 0.0, "train-no-bias"),
    )
    demo.wrote("comparison run without the bias update", out / "train-no-bias")
    late = slice(int(0.8 * size.comparison_steps), size.comparison_steps)
    demo.report.training = {
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": demo.report.stage_seconds["pre-training (bias update on)"],
        "first_loss": records[0].loss,
        "final_loss": records[-1].loss,
        "tokens_per_second": _mean(r.tokens_per_second for r in records),
        # compared over the same steps: the last fifth of the (shorter) comparison run
        "late_steps": (late.start + 1, late.stop),
        "late_load_cv": {
            "bias on": _mean(r.load_cv for r in records[late]),
            "bias off": _mean(r.load_cv for r in comparison[late]),
        },
    }

    demo.report.perplexity["after"] = demo.stage("perplexity after training", lambda: demo.perplexity(model, batches))
    print(f"held-out perplexity after training: {demo.report.perplexity['after']:.1f}")
    demo.stage("completions", lambda: demo.samples(model, tokenizer))
    model_dir = demo.stage("save and reload", lambda: demo.save_and_reload(model, tokenizer, batches))
    demo.stage("LoRA fine-tune and merge", lambda: demo.finetune(model_dir, tokenizer))
    demo.stage("official-format export", lambda: demo.export_official(model, batches))
    demo.stage("FP8 export", lambda: demo.export_fp8(model_dir, batches))
    demo.stage("plots", lambda: demo.plots(records, comparison))
    shutil.rmtree(out / CACHE_DIRECTORY / "tmp", ignore_errors=True)  # emptied temporary files
    demo.finish(started)
    report = demo.report
    passed = report.perplexity["after"] < report.perplexity["before"] and report.reload_logits_equal
    return 0 if passed and report.mtp_equals_greedy else 1
