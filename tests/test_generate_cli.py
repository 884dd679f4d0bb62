"""`deepseek-moe generate` streams the same greedy tokens as `model.generate`, with and without a tokenizer."""

from __future__ import annotations

import torch
from conftest import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from deepseek_moe import DeepseekMoeConfig
from deepseek_moe.cli import main


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on a few lines (no downloads)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="dog")


def _saved_model(path, with_tokenizer: bool):
    config = DeepseekMoeConfig.from_preset("tiny-v3", vocab_size=512, num_nextn_predict_layers=1)
    model = tiny_model(config, seed=5).eval()
    model.save_pretrained(path)
    tokenizer = _tokenizer() if with_tokenizer else None
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model, tokenizer


def test_generate_streams_text(tmp_path, capsys):
    model, tokenizer = _saved_model(tmp_path, with_tokenizer=True)
    assert main(["generate", str(tmp_path), "--prompt", "the quick brown", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    input_ids = tokenizer("the quick brown", return_tensors="pt").input_ids
    expected = model.generate(input_ids, max_new_tokens=6, do_sample=False)[0, input_ids.shape[1] :]
    assert printed.strip() == tokenizer.decode(expected).strip()


def test_generate_with_token_ids_and_mtp(tmp_path, capsys):
    model, _ = _saved_model(tmp_path, with_tokenizer=False)
    assert main(["generate", str(tmp_path), "--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "5"]) == 0
    plain = capsys.readouterr().out.split()
    assert main(["generate", str(tmp_path), "--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "5", "--use-mtp"]) == 0
    speculative = capsys.readouterr().out.split()
    expected = model.generate(torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=5, do_sample=False)[0, 5:].tolist()
    assert plain == speculative == [str(t) for t in expected]


def test_generate_without_tokenizer_needs_ids(tmp_path, capsys):
    _saved_model(tmp_path, with_tokenizer=False)
    assert main(["generate", str(tmp_path), "--prompt", "hello"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
