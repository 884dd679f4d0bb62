"""`deepseek-moe generate` streams the same greedy tokens as `model.generate`, with and without a tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from checkpoint_utils import write_fp8_checkpoint
from conftest import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
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
    captured = capsys.readouterr()
    speculative = captured.out.split()
    assert "MTP draft acceptance" in captured.err
    expected = model.generate(torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=5, do_sample=False)[0, 5:].tolist()
    assert plain == speculative == [str(t) for t in expected]
    argv = ["generate", str(tmp_path), "--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "5", "--use-mtp"]
    assert main([*argv, "--draft-tokens", "3"]) == 0  # one module, drafting three tokens a step
    captured = capsys.readouterr()
    assert captured.out.split() == plain and "MTP draft acceptance" in captured.err
    for device_map in ("cpu", "auto"):
        assert main([*argv[:-1], "--device-map", device_map]) == 0
        assert capsys.readouterr().out.split() == plain


def test_console_script_on_a_folder_without_tokenizer_asks_nothing(tmp_path):
    """The console script starts without registering our classes, and a folder saved by `save_pretrained` names its
    code in `auto_map`: looking for a tokenizer must neither ask on the terminal whether to run that code nor warn
    about the config's model type."""
    model, _ = _saved_model(tmp_path, with_tokenizer=False)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseek_moe.cli",
            "generate",
            str(tmp_path),
            "--prompt-ids",
            "3,1,4",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    expected = model.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=3, do_sample=False)[0, 3:].tolist()
    assert completed.stdout.split() == [str(t) for t in expected]
    for noise in ("custom code", "trust_remote_code", "to instantiate a model of type"):
        assert noise not in completed.stdout + completed.stderr, completed.stderr


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_generate_prepacked_streams_the_same_tokens(tmp_path, capsys):
    """`--prepack` (with and without MTP) gives the plain model's greedy tokens and says how much it copied; it
    refuses a model off the CPU, in float16, or with nothing a megabyte or larger to pack."""
    config = DeepseekMoeConfig.from_preset("tiny-v3", vocab_size=4096, num_nextn_predict_layers=1)  # 1 MB lm_head
    model = tiny_model(config, seed=5).eval()
    model.save_pretrained(tmp_path / "model")
    w_uk = config.num_attention_heads * config.qk_nope_head_dim * config.kv_lora_rank  # per attention, W_UKᵀ
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    copies = 4 * (config.vocab_size * config.hidden_size + layers * w_uk)  # lm_head (the only linear of 1 MB)
    argv = ["generate", str(tmp_path / "model"), "--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "6", "--prepack"]
    expected = model.generate(torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=6, do_sample=False)[0, 5:].tolist()
    for extra in ([], ["--use-mtp"]):
        assert main([*argv, *extra]) == 0
        captured = capsys.readouterr()
        assert captured.out.split() == [str(t) for t in expected]
        assert f"[prepacked {copies / 1e6:.1f} MB of weight copies for oneDNN]" in captured.err
    err = _error([*argv, "--device-map", "auto"], capsys)
    assert "--prepack is for inference on the CPU, not --device-map auto: add --device-map cpu" in err
    err = _error([*argv, "--dtype", "float16"], capsys)
    assert "--prepack runs float32 or bfloat16, not --dtype float16" in err
    model.half().save_pretrained(tmp_path / "half")  # `--dtype auto`: the checkpoint's float16
    err = _error(["generate", str(tmp_path / "half"), "--prompt-ids", "1", "--prepack"], capsys)
    assert "--prepack: prepack_cpu_weights packs float32" in err and "(its weights are torch.float16 on cpu)" in err
    _saved_model(tmp_path / "small", with_tokenizer=False)
    err = _error(["generate", str(tmp_path / "small"), "--prompt-ids", "1", "--prepack"], capsys)
    assert "at least min_bytes=1048576; this model has none" in err


def test_generate_without_tokenizer_needs_ids(tmp_path, capsys):
    _saved_model(tmp_path, with_tokenizer=False)
    assert main(["generate", str(tmp_path), "--prompt", "hello"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_text_prompt_without_tokenizer_fails_before_loading_weights(tmp_path, capsys, monkeypatch):
    _saved_model(tmp_path, with_tokenizer=False)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(DeepseekMoeForCausalLM, "from_pretrained", no_loading)
    err = _error(["generate", str(tmp_path), "--prompt", "hello"], capsys)
    assert "has no tokenizer" in err and "--prompt-ids" in err and "--tokenizer PATH" in err


def test_tokenizer_from_another_folder(tmp_path, capsys):
    model, _ = _saved_model(tmp_path / "model", with_tokenizer=False)
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    argv = ["generate", str(tmp_path / "model"), "--prompt", "the quick", "--max-new-tokens", "4"]
    assert main([*argv, "--tokenizer", str(tmp_path / "tokenizer")]) == 0
    input_ids = tokenizer("the quick", return_tensors="pt").input_ids
    expected = model.generate(input_ids, max_new_tokens=4, do_sample=False)[0, input_ids.shape[1] :]
    assert capsys.readouterr().out.strip() == tokenizer.decode(expected).strip()


def test_clear_errors_for_bad_requests(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    err = _error(["generate", str(missing), "--prompt-ids", "1"], capsys)
    assert "no such directory" in err and "Repo id" not in err
    _saved_model(tmp_path / "model", with_tokenizer=False)
    err = _error(["generate", str(tmp_path / "model"), "--prompt-ids", "3,512,-1"], capsys)
    assert "[512, -1] outside the vocabulary (0..511)" in err
    err = _error(["generate", str(tmp_path / "model"), "--prompt-ids", "3,x"], capsys)
    assert "comma-separated integers" in err
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=0)
    DeepseekMoeForCausalLM(config).save_pretrained(tmp_path / "plain")
    err = _error(["generate", str(tmp_path / "plain"), "--prompt-ids", "1,2", "--use-mtp"], capsys)
    assert "no MTP modules" in err
    if not torch.cuda.is_available():
        err = _error(["generate", str(tmp_path / "model"), "--prompt-ids", "1", "--device-map", "cuda"], capsys)
        assert "--device-map cuda: this machine has no CUDA device" in err
    err = _error(["generate", str(tmp_path / "model"), "--prompt-ids", "1", "--device-map", "gpu0"], capsys)
    assert "--device-map 'gpu0': expected cpu, cuda, cuda:N, auto" in err
    err = _error(["generate", str(tmp_path / "model"), "--prompt-ids", "1", "--device-map", "meta"], capsys)
    assert "--device-map 'meta': expected cpu, cuda, cuda:N or a spreading strategy" in err
    err = _error(["generate", str(tmp_path / "model"), "--prompt-ids", "1,2", "--draft-tokens", "2"], capsys)
    assert "--draft-tokens needs --use-mtp" in err
    err = _error(["generate", str(tmp_path / "model"), "--prompt-ids", "1", "--use-mtp", "--draft-tokens", "0"], capsys)
    assert "--draft-tokens must be at least 1, got 0" in err


def test_truncated_shard_is_named(tmp_path, capsys):
    _saved_model(tmp_path, with_tokenizer=False)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    err = _error(["generate", str(tmp_path), "--prompt-ids", "1,2"], capsys)
    assert f"{shard}: tensor" in err and "the file has" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="kept FP8 weights need a GPU where the FP8 kernels run")
def test_generate_keeps_an_fp8_checkpoint_in_fp8_on_a_gpu(tmp_path, capsys, monkeypatch):
    """By default the command loads onto the first GPU, where an official FP8 folder keeps its E4M3 weights."""
    folder, _ = write_fp8_checkpoint(tmp_path, moe_intermediate_size=128)
    loaded, from_pretrained = [], DeepseekMoeForCausalLM.from_pretrained
    monkeypatch.setattr(
        DeepseekMoeForCausalLM,
        "from_pretrained",
        lambda *args, **kwargs: loaded.append(from_pretrained(*args, **kwargs)) or loaded[-1],
    )
    assert main(["generate", str(folder), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.split()) == 4
    model = loaded[0]
    assert model.device.type == "cuda"
    assert any(parameter.dtype == torch.float8_e4m3fn for parameter in model.parameters())
