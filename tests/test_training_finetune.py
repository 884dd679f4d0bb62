"""`deepseek-moe finetune` / `merge`: chat data with assistant-only labels, LoRA on attention, MLPs and routed experts
(never the router) with gradient accumulation, the correction bias saved with the adapter, exact reload and merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.cli import main
from deepseek_moe.training.finetune import FinetuneArguments, finetune, tokenize_chat

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QUESTIONS = [
    "what is red",
    "name a colour",
    "what is blue",
    "say hello",
    "count to three",
    "what sound does a cat make",
]
ANSWERS = ["red is a colour", "green", "blue is a colour", "hello there", "one two three", "a cat says meow"]


def _tokenizer():
    """A BPE tokenizer trained on the chat strings, with a chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(QUESTIONS + ANSWERS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[3:]})
    return tokenizer


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = _tokenizer()
    model = randomize_(DeepseekMoeForCausalLM(DeepseekMoeConfig.from_preset("tiny-v3")), seed=1)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    with open(root / "chat.jsonl", "w") as file:
        for question, answer in zip(QUESTIONS, ANSWERS, strict=True):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            file.write(json.dumps({"messages": messages}) + "\n")
    return root


def test_chat_labels_cover_assistant_turns_only() -> None:
    tokenizer = _tokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "say hello"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "count to three"},
        {"role": "assistant", "content": "one two three"},
    ]
    encoded = tokenize_chat(tokenizer, messages, max_length=256)
    trained = [token for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != -100]
    assert tokenizer.decode(trained) == "hello there</s>one two three</s>"
    assert all(label in (-100, token) for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True))


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["<|user|>what is red</s><|assistant|>red is", "say hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_lora_finetune_reload_and_merge(base_and_data, tmp_path) -> None:
    from peft import PeftModel

    root = base_and_data
    args = FinetuneArguments(
        model=str(root / "base"),
        data=[str(root / "chat.jsonl")],
        lora_r=4,
        lora_alpha=8,
        update_bias=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=1e-2,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=1000,
        output_dir=str(tmp_path / "run"),
    )
    result = finetune(args)
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    trained, tokenizer = result.model.eval(), _tokenizer()
    base = DeepseekMoeForCausalLM.from_pretrained(root / "base")
    base_state, trained_state = base.state_dict(), trained.get_base_model().state_dict()
    # LoRA reached attention, dense and shared MLPs and the routed experts, not the router.
    lora_modules = {name for name, _ in trained.named_parameters() if "lora_A" in name}
    for part in ("q_a_proj", "kv_b_proj", "o_proj", "layers.0.mlp.gate_proj", "shared_experts.down_proj", "experts"):
        assert any(part in name for name in lora_modules), part
    assert not any("mlp.gate.lora" in name or "mlp.gate.weight" in name for name in lora_modules)
    for key in base_state:
        if key.endswith("mlp.gate.weight"):
            assert torch.equal(trained_state[key], base_state[key]), key
    biases = [key for key in base_state if key.endswith("e_score_correction_bias")]
    assert biases and all(not torch.equal(trained_state[k], base_state[k]) for k in biases)  # --update-bias moved it

    expected = _logits(trained, tokenizer)
    reloaded = PeftModel.from_pretrained(DeepseekMoeForCausalLM.from_pretrained(root / "base"), result.model_path)
    torch.testing.assert_close(_logits(reloaded.eval(), tokenizer), expected, rtol=0, atol=0)
    reloaded_state = reloaded.get_base_model().state_dict()
    assert all(torch.equal(reloaded_state[k], trained_state[k]) for k in biases)
    assert main(["merge", result.model_path, str(tmp_path / "merged")]) == 0
    merged = DeepseekMoeForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, tokenizer), expected, rtol=1e-5, atol=1e-5)
    for key in biases:
        assert torch.equal(merged.state_dict()[key], trained_state[key])
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_lora_keeps_bias_frozen_by_default(base_and_data, tmp_path) -> None:
    root = base_and_data
    args = FinetuneArguments(
        model=str(root / "base"),
        data=[str(root / "chat.jsonl")],
        lora_r=2,
        lora_alpha=4,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        save_steps=1000,
        output_dir=str(tmp_path / "run"),
    )
    result = finetune(args)
    base = DeepseekMoeForCausalLM.from_pretrained(root / "base").state_dict()
    trained = result.model.get_base_model().state_dict()
    biases = [key for key in base if key.endswith("e_score_correction_bias")]
    assert biases and all(torch.equal(trained[k], base[k]) for k in biases)
    assert Path(result.model_path, "adapter_config.json").exists()


def test_full_finetune_on_text_moves_bias_and_saves_a_model(base_and_data, tmp_path) -> None:
    root = base_and_data
    (tmp_path / "notes.txt").write_text("\n\n".join(QUESTIONS + ANSWERS) + "\n")
    args = FinetuneArguments(
        model=str(root / "base"),
        data=[str(tmp_path / "notes.txt")],
        method="full",
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        save_steps=1000,
        output_dir=str(tmp_path / "run"),
    )
    result = finetune(args)
    saved = DeepseekMoeForCausalLM.from_pretrained(result.model_path).state_dict()
    base = DeepseekMoeForCausalLM.from_pretrained(root / "base").state_dict()
    biases = [key for key in base if key.endswith("e_score_correction_bias")]
    assert biases and all(not torch.equal(saved[k], base[k]) for k in biases)  # full fine-tuning: config's speed
    assert not torch.equal(
        saved["model.layers.1.mlp.experts.gate_up_proj"], base["model.layers.1.mlp.experts.gate_up_proj"]
    )
