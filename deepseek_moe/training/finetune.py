"""Fine-tuning on transformers' `Trainer`: `deepseek-moe finetune` and `deepseek-moe merge`, or from Python:

    from deepseek_moe.training.finetune import FinetuneArguments, finetune, merge_adapter

    result = finetune(FinetuneArguments(model="path/to/model", data=["chat.jsonl"], method="lora"))
    merge_adapter(result.model_path, "path/to/merged")  # a standalone checkpoint

Data: rows with a `messages` column (lists of {"role", "content"}) are rendered with the tokenizer's chat template and
only the assistant turns' tokens are trained on; other rows are plain causal text (`text` column or text files).

LoRA (PEFT) targets by default the attention projections (MLA: q_proj or q_a_proj/q_b_proj, kv_a_proj_with_mqa,
kv_b_proj, o_proj; MHA: q/k/v/o_proj), the dense MLPs and shared experts (gate/up/down_proj) and the routed experts'
3D tensors (`target_parameters` mlp.experts.gate_up_proj / down_proj); the router is never adapted. With LoRA the V3
correction bias stays frozen unless `update_bias=True`; then it is stored in the adapter file next to the LoRA
weights, so `PeftModel.from_pretrained` and `merge_adapter` restore it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

BIAS_SUFFIX = "mlp.gate.e_score_correction_bias"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EXPERT_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclass
class FinetuneArguments:
    """Fine-tuning settings (docs/TRAINING.md); those not listed here keep transformers' `TrainingArguments`
    defaults, and `trainer_overrides` passes any of them through."""

    model: str = ""
    """A saved model directory; a preset name builds a random model (for trying the pipeline)."""
    data: list[str] = field(default_factory=list)
    eval_data: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    """A tokenizer directory / Hub name, "bytes", or None: the model's."""
    data_format: str = "auto"
    """"chat" (a `messages` column), "text" (a `text` column / text files), or "auto" (chat when `messages` exists)."""
    messages_field: str = "messages"
    text_field: str = "text"
    text_sample_by: str = "paragraph"
    max_length: int = 2048
    method: str = "lora"
    """"lora" (PEFT adapter) or "full" (every weight)."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target_modules: list[str] | None = None
    """None = the MLA/MHA projections and every dense/shared MLP projection present in the model."""
    lora_experts: bool = True
    """Also adapt the routed experts' 3D tensors (PEFT `target_parameters`)."""
    update_bias: bool = False
    """Move the V3 correction bias during LoRA fine-tuning (full fine-tuning follows the config's speed)."""
    output_dir: str = "runs/deepseek-moe-finetune"
    learning_rate: float = 1e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    eval_steps: int | None = None
    report_to: str = "none"
    resume_from_checkpoint: str | None = None
    trainer_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.eval_data, str):
            self.eval_data = [self.eval_data]
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', got {self.method!r}")
        if self.data_format not in ("auto", "chat", "text"):
            raise ValueError(f"data_format must be 'auto', 'chat' or 'text', got {self.data_format!r}")


@dataclass
class FinetuneResult:
    """`model_path`: the adapter directory (LoRA) or the full model directory; `log_history`: the Trainer's logs;
    `model`: the trained model (a `PeftModel` with LoRA)."""

    model_path: str
    train_loss: float
    log_history: list[dict[str, Any]]
    model: Any = None


# --------------------------------------------------------------------------------------------------------- data


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns, from renderings of its prefixes
    (the text up to a turn, with the generation prompt, then through it)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render conversations prefix by prefix; use data_format=text")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_chat(tokenizer, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """Input ids of a rendered conversation and labels that keep only the assistant turns' tokens."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    labels = [
        token if any(start <= first and last <= end for start, end in spans) and last > first else -100
        for token, (first, last) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    return {"input_ids": encoded["input_ids"], "labels": labels}


def prepare_dataset(documents, tokenizer, args: FinetuneArguments):
    """Tokenized examples (`input_ids`, `labels`) from chat or text rows; rows left with no target are dropped."""
    columns = documents.column_names
    chat = args.data_format == "chat" or (args.data_format == "auto" and args.messages_field in columns)
    if chat:
        if args.messages_field not in columns:
            raise ValueError(f"chat data needs a {args.messages_field!r} column; the data has {columns}")
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; give one or use data_format=text")

        def encode(row: dict[str, Any]) -> dict[str, list[int]]:
            return tokenize_chat(tokenizer, row[args.messages_field], args.max_length)

    else:
        if args.text_field not in columns:
            raise ValueError(f"the data has no {args.text_field!r} column (columns: {columns})")

        def encode(row: dict[str, Any]) -> dict[str, list[int]]:
            ids = tokenizer(row[args.text_field], truncation=True, max_length=args.max_length)["input_ids"]
            return {"input_ids": ids, "labels": list(ids)}

    encoded = documents.map(encode, remove_columns=columns)
    return encoded.filter(lambda row: any(label != -100 for label in row["labels"][1:]))


# --------------------------------------------------------------------------------------------------------- LoRA


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """Attention and MLP projection names present in `model` (never the router `mlp.gate`)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return [name for name in (*ATTENTION_TARGETS, *MLP_TARGETS) if name in names]


def lora_config(model: torch.nn.Module, args: FinetuneArguments):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,  # PEFT's target_parameters (the 3D experts) take no dropout
        target_modules=args.lora_target_modules or default_lora_targets(model),
        target_parameters=list(EXPERT_TARGETS) if args.lora_experts else None,
        task_type="CAUSAL_LM",
    )


def correction_biases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The V3 correction biases by state-dict key (PEFT-wrapped or not)."""
    return {key: value for key, value in model.state_dict().items() if key.endswith(BIAS_SUFFIX)}


def save_adapter(peft_model, directory: str | os.PathLike, include_bias: bool) -> None:
    """`save_pretrained` of the adapter; with `include_bias`, the correction biases go into the adapter file under
    their model keys, which PEFT's loader passes through to the model, so a reload restores them."""
    from safetensors.torch import load_file, save_file

    peft_model.save_pretrained(str(directory))
    if include_bias:
        path = Path(directory) / ADAPTER_WEIGHTS
        tensors = load_file(str(path))
        tensors.update({key: value.detach().cpu().contiguous() for key, value in correction_biases(peft_model).items()})
        save_file(tensors, str(path), metadata={"format": "pt"})


def _adapter_save_callback(include_bias: bool):
    from transformers import TrainerCallback

    class AdapterBiasCallback(TrainerCallback):
        """Adds the correction biases to each Trainer checkpoint's adapter file (so a resume restores them)."""

        def on_save(self, args, state, control, model=None, **kwargs) -> None:
            if include_bias and state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if (checkpoint / ADAPTER_WEIGHTS).exists():
                    save_adapter(model, checkpoint, include_bias=True)

    return AdapterBiasCallback()


# ------------------------------------------------------------------------------------------------------ finetune


def finetune(args: FinetuneArguments, *, model=None, tokenizer=None, callbacks: list | None = None) -> FinetuneResult:
    """Fine-tune with transformers' Trainer (`ExpertBalanceCallback` does the bias update once per optimizer step) and
    save the adapter (LoRA) or the model (full) and tokenizer to `args.output_dir/final`, written to a temporary
    directory first. `model`/`tokenizer` replace the ones `args` names. Bad settings raise before training."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from .balancing import ExpertBalanceCallback
    from .data import check_data_paths, load_documents
    from .pretrain import check_model_fits, load_config, load_tokenizer

    if not args.data:
        raise ValueError("no training data; give --data FILE [FILE ...]")
    check_data_paths(args.data)
    if args.eval_data:
        check_data_paths(args.eval_data)
    config = model.config if model is not None else load_config(args.model, {})
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(args.tokenizer, args.model)
    check_model_fits(config, tokenizer, args.max_length)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is None:
        model = _load_model(args.model, config, args.seed)

    train_data = prepare_dataset(load_documents(args.data, text_sample_by=args.text_sample_by), tokenizer, args)
    eval_data = None
    if args.eval_data:
        eval_data = prepare_dataset(load_documents(args.eval_data, text_sample_by=args.text_sample_by), tokenizer, args)
    if len(train_data) == 0:
        raise ValueError("no training example has a target token (check the data format and max_length)")

    lora = args.method == "lora"
    gamma = None if (not lora or args.update_bias) else 0.0
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model, args))
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        learning_rate=args.learning_rate,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        weight_decay=args.weight_decay,
        adam_beta2=args.adam_beta2,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        eval_strategy="steps" if eval_data is not None and args.eval_steps else "no",
        eval_steps=args.eval_steps,
        report_to=args.report_to,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        **args.trainer_overrides,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=[ExpertBalanceCallback(gamma=gamma), _adapter_save_callback(lora and args.update_bias)]
        + list(callbacks or []),
    )
    output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    final = Path(args.output_dir) / "final"
    if trainer.is_world_process_zero():
        temp = Path(args.output_dir) / ".tmp-final"
        if temp.exists():
            shutil.rmtree(temp)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if lora:
            save_adapter(unwrapped, temp, include_bias=args.update_bias)
        else:
            unwrapped.save_pretrained(str(temp))
        tokenizer.save_pretrained(str(temp))
        (temp / "finetune_args.json").write_text(json.dumps(asdict(args), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(
        model_path=str(final),
        train_loss=output.training_loss,
        log_history=trainer.state.log_history,
        model=trainer.accelerator.unwrap_model(trainer.model),
    )


def _load_model(name: str, config, seed: int):
    from transformers import set_seed

    from ..model import DeepseekMoeForCausalLM
    from .pretrain import _is_pretrained_dir

    if _is_pretrained_dir(Path(name).expanduser()):
        return DeepseekMoeForCausalLM.from_pretrained(str(Path(name).expanduser()), dtype=torch.float32)
    from ..presets import PRESETS

    if name not in PRESETS:
        raise ValueError(f"{name} has a config but no weights; fine-tuning needs a saved model or a preset")
    set_seed(seed)
    return DeepseekMoeForCausalLM(config)


# --------------------------------------------------------------------------------------------------------- merge


def merge_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Merge a LoRA adapter into its base model (the adapter's `base_model_name_or_path`, or `base_model`) and save a
    standalone checkpoint (with the adapter's tokenizer, if it has one) to `output_dir`, written to a temporary
    directory next to it and renamed when complete. Correction biases saved with the adapter are kept."""
    from peft import PeftConfig, PeftModel

    from ..model import DeepseekMoeForCausalLM

    adapter_dir, output_dir = Path(adapter_dir).expanduser(), Path(output_dir).expanduser()
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} already exists; choose a new output directory")
    base = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base:
        raise ValueError(f"the adapter in {adapter_dir} does not name its base model; give --base-model")
    model = DeepseekMoeForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    temp = output_dir.parent / f".tmp-{output_dir.name}"
    if temp.exists():
        shutil.rmtree(temp)
    merged.save_pretrained(str(temp))
    if any(adapter_dir.glob("tokenizer*")):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(temp))
    os.replace(temp, output_dir)
    return output_dir
