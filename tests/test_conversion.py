"""`deepseek-moe convert`: official checkpoints in and out, FP8, model-parallel files, resharding, streaming memory,
and bad input that gets a clear error and leaves nothing behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from checkpoint_utils import (
    QUANTIZATION_CONFIG,
    dequantize,
    official_config,
    official_v3_config,
    quantize_fp8,
    to_official_fp8,
    write_sharded,
)
from conftest import assert_close, builtin_config, file_tree, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synthetic import write_random_checkpoint
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.cli import main
from deepseek_moe.conversion import (
    AUTO_MAP,
    Checkpoint,
    ConversionError,
    convert_checkpoint,
    parse_size,
    plan_conversion,
    quantize_fp8_blockwise,
    safetensors_io,
    verify_conversion,
)
from deepseek_moe.conversion import convert as convert_module
from deepseek_moe.conversion.streamed_logits import largest_layer_bytes, streamed_logits

CHILDREN = Path(__file__).resolve().parent  # the child_*.py scripts some tests run in a fresh process
TOKENIZER_FILES = {"tokenizer.json": "{}", "tokenizer_config.json": '{"model_max_length": 16}'}
# Partial 128-blocks everywhere: kv_a_proj_with_mqa has 136 + 8 rows, the dense MLP 200.
EDGE_BLOCKS = dict(hidden_size=136, intermediate_size=200, kv_lora_rank=136)


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the safetensors library."""
    return {k: v for path in sorted(directory.glob("*.safetensors")) for k, v in load_file(path).items()}


def logits(model: torch.nn.Module, vocab_size: int) -> torch.Tensor:
    input_ids = torch.randint(0, vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.float().eval()(input_ids).logits


def save_official(config: DeepseekMoeConfig, directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomized model saved as DeepSeek ships it (official config.json, tokenizer files); returns its tensors."""
    tiny_model(config, seed=seed).save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(official_config(config)))
    for name, text in TOKENIZER_FILES.items():
        (directory / name).write_text(text)
    return load_file(directory / "model.safetensors")


def no_partial_output(output: Path) -> bool:
    return not output.exists() and not list(output.parent.glob(f".{output.name}.*"))


def test_official_fp8_v3_to_ours_dequantizes_and_translates_the_config(tmp_path):
    config = DeepseekMoeConfig.from_preset("tiny-v3", **EDGE_BLOCKS)
    source = tiny_model(config, seed=3)
    source.save_pretrained(tmp_path / "plain")
    state = load_file(tmp_path / "plain" / "model.safetensors")
    mtp = f"model.layers.{config.num_hidden_layers}."
    state[mtp + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()  # DeepSeek's MTP copies
    state[mtp + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    fp8_state, dequantized = to_official_fp8(state)
    official = tmp_path / "official"
    official.mkdir()
    write_sharded(fp8_state, official, official_v3_config(config, quantization_config=QUANTIZATION_CONFIG))
    for name, text in {**TOKENIZER_FILES, "generation_config.json": '{"bos_token_id": 0}'}.items():
        (official / name).write_text(text)

    report = convert_checkpoint(official, tmp_path / "ours", dtype="bf16", verify=True, progress=False)
    assert report.logits_error is not None and report.dropped == []
    out = read_all(tmp_path / "ours")
    assert set(out) == set(dequantized)  # scales gone, MTP layer (with its copies) kept
    for name, tensor in out.items():
        expected_dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert tensor.dtype == expected_dtype, name
        assert torch.equal(tensor, dequantized[name].to(expected_dtype)), name

    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "deepseek_moe" and written["auto_map"] == AUTO_MAP
    assert written["architectures"] == ["DeepseekMoeForCausalLM"]  # not the official DeepseekV3ForCausalLM
    assert "quantization_config" not in written and written["num_nextn_predict_layers"] == 1
    for name in [
        *TOKENIZER_FILES,
        "generation_config.json",
        "modeling_deepseek_moe.py",
        "configuration_deepseek_moe.py",
    ]:
        assert (tmp_path / "ours" / name).is_file(), name

    # fp32 output without MTP: loads with our class and transformers' built-in V3, both matching the reference logits.
    convert_checkpoint(official, tmp_path / "fp32", dtype="fp32", drop_mtp=True, verify=True, progress=False)
    assert not any(name.startswith(mtp) for name in read_all(tmp_path / "fp32"))
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    reference_config = DeepseekMoeConfig.from_preset("tiny-v3", **EDGE_BLOCKS, num_nextn_predict_layers=0)
    reference = DeepseekMoeForCausalLM(reference_config)
    reference.load_state_dict(
        {k: v.float() for k, v in dequantized.items() if not k.startswith(mtp)}, strict=False, assign=True
    )
    ours = DeepseekMoeForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    builtin_config(reference_config).save_pretrained(tmp_path / "fp32")  # the built-in class needs its own config
    builtin = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    expected = logits(builtin, config.vocab_size)
    assert_close(logits(ours, config.vocab_size), expected, 1e-5)
    assert torch.equal(
        ours.model.layers[1].mlp.experts.down_proj[2], dequantized["model.layers.1.mlp.experts.2.down_proj.weight"]
    )


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2", "tiny-v2-lite", "tiny-16b"])
def test_round_trip_is_exact_and_loads_with_ours_and_builtin(tmp_path, preset):
    config = DeepseekMoeConfig.from_preset(preset)
    state = save_official(config, tmp_path / "official", seed=1)

    # fp32 → bf16 (resharded) → fp32 gives exactly the bf16 rounding of the source.
    convert_checkpoint(tmp_path / "official", tmp_path / "bf16", dtype="bf16", max_shard_size="200KB", progress=False)
    assert len(list((tmp_path / "bf16").glob("model-*.safetensors"))) > 1
    convert_checkpoint(tmp_path / "bf16", tmp_path / "back", dtype="fp32", verify=True, progress=False)
    back = read_all(tmp_path / "back")
    assert set(back) == set(state)
    for name, tensor in state.items():
        bf16 = tensor if name.endswith("e_score_correction_bias") else tensor.to(torch.bfloat16).float()  # kept fp32
        assert torch.equal(back[name], bf16), name

    # fp32 → fp32 is bit-exact, and loads with our class and transformers' built-in one with equal logits.
    convert_checkpoint(tmp_path / "official", tmp_path / "fp32", verify=True, progress=False)
    assert all(torch.equal(tensor, state[name]) for name, tensor in read_all(tmp_path / "fp32").items())
    ours = DeepseekMoeForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    expected = logits(DeepseekMoeForCausalLM.from_pretrained(tmp_path / "official", dtype=torch.float32), 512)
    assert torch.equal(logits(ours, config.vocab_size), expected)
    if config.uses_mla:  # transformers has no built-in DeepSeekMoE-16B
        convert_checkpoint(tmp_path / "official", tmp_path / "builtin", drop_mtp=True, progress=False)
        builtin_config(config).save_pretrained(tmp_path / "builtin")
        builtin_class = DeepseekV3ForCausalLM if config.uses_bias_balancing else DeepseekV2ForCausalLM
        builtin = builtin_class.from_pretrained(tmp_path / "builtin", dtype=torch.float32)
        assert_close(logits(builtin, 512), expected, 1e-5)


def test_fp8_round_trip_stays_within_quantization_error(tmp_path):
    config = DeepseekMoeConfig.from_preset("tiny-v3", **EDGE_BLOCKS)
    state = save_official(config, tmp_path / "official", seed=2)
    convert_checkpoint(tmp_path / "official", tmp_path / "fp8", target="fp8", verify=True, progress=False)
    fp8 = read_all(tmp_path / "fp8")
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"] == QUANTIZATION_CONFIG
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert fp8[kv_a].dtype == torch.float8_e4m3fn and fp8[kv_a + "_scale_inv"].shape == (2, 2)
    for name, tensor in state.items():
        if name + "_scale_inv" in fp8:  # same bytes and scales as the independent block quantizer
            quantized, scale = quantize_fp8(tensor)
            assert torch.equal(fp8[name].view(torch.uint8), quantized.view(torch.uint8)), name
            assert torch.equal(fp8[name + "_scale_inv"], scale), name
        elif name.endswith("e_score_correction_bias"):
            assert fp8[name].dtype == torch.float32 and torch.equal(fp8[name], tensor)
        else:  # embeddings, head, norms, router stay bf16 as in DeepSeek's release
            assert fp8[name].dtype == torch.bfloat16 and torch.equal(fp8[name], tensor.to(torch.bfloat16)), name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert name + "_scale_inv" not in fp8
    assert f"model.layers.{config.num_hidden_layers}.eh_proj.weight_scale_inv" in fp8

    convert_checkpoint(tmp_path / "fp8", tmp_path / "back", dtype="fp32", verify=True, progress=False)
    back = read_all(tmp_path / "back")
    for name, tensor in state.items():
        if name + "_scale_inv" in fp8:
            assert torch.equal(back[name], dequantize(fp8[name], fp8[name + "_scale_inv"])), name
            error = (back[name] - tensor).abs()
            assert (error <= tensor.abs() / 16 + fp8[name + "_scale_inv"].max() / 1024).all(), name
    # FP8 → FP8 keeps the stored values and scales bit for bit.
    convert_checkpoint(tmp_path / "fp8", tmp_path / "again", target="fp8", progress=False)
    again = read_all(tmp_path / "again")
    assert all(torch.equal(again[n].view(torch.uint8), t.view(torch.uint8)) for n, t in fp8.items() if t.dim() == 2)


@pytest.mark.parametrize(
    ("source", "options"),
    [("bf16", {}), ("bf16", {"target": "mp", "mp": 1}), ("bf16", {"target": "mp", "mp": 2}), ("fp8", {"target": "fp8"}),
     ("fp8", {"target": "mp", "mp": 1}), ("fp32", {"dtype": "bf16"}), ("bf16", {"target": "mp", "dtype": "fp16"})],
    ids=["bf16 to ours", "bf16 to mp1", "bf16 to mp2", "fp8 to fp8", "fp8 to mp1", "fp32 cast to bf16",
         "bf16 cast to fp16 mp1"],
)  # fmt: skip
def test_copied_tensors_are_the_bytes_torch_would_write(tmp_path, monkeypatch, source, options):
    """Tensors that keep their bytes are streamed from the source file without torch, and plain casts chunk by chunk
    (`write_cast`; chunks made smaller than the tensors here); forced through torch instead (read whole, cast, sliced,
    written) every file comes out byte-identical, and some were streamed. (One model-parallel rank splits nothing, so
    FP8 weights need not be whole 128-row blocks there.)"""
    monkeypatch.setattr(safetensors_io, "COPY_CHUNK", 4000)
    config = DeepseekMoeConfig.from_preset("tiny-v3", **EDGE_BLOCKS)
    save_official(config, tmp_path / "fp32", seed=6)
    convert_checkpoint(tmp_path / "fp32", tmp_path / "bf16", dtype="bf16", progress=False)
    convert_checkpoint(tmp_path / "fp32", tmp_path / "fp8", target="fp8", progress=False)
    plan = plan_conversion(tmp_path / source, **options)
    assert any(step.make is None for step in plan.steps)
    convert_checkpoint(tmp_path / source, tmp_path / "copied", progress=False, **options)
    monkeypatch.setattr(convert_module, "_copies", lambda source, names, dtypes: [None] * len(names))
    assert all(step.make is not None for step in plan_conversion(tmp_path / source, **options).steps)
    convert_checkpoint(tmp_path / source, tmp_path / "computed", progress=False, **options)
    assert file_tree(tmp_path / "copied") == file_tree(tmp_path / "computed")


def test_vectorized_quantizer_matches_the_block_loop():
    for shape in [(576, 300), (64, 48), (129, 257)]:
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
        weight[:128, :128] = 0  # an all-zero block gets the clamped scale, not a division by zero
        quantized, scale = quantize_fp8_blockwise(weight)
        reference, reference_scale = quantize_fp8(weight)
        assert torch.equal(scale, reference_scale) and torch.equal(
            quantized.view(torch.uint8), reference.view(torch.uint8)
        )


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_model_parallel_format_round_trip_is_exact(tmp_path, mp):
    config = DeepseekMoeConfig.from_preset("tiny-v3")
    state = save_official(config, tmp_path / "official", seed=4)
    report = convert_checkpoint(tmp_path / "official", tmp_path / "mp", target="mp", mp=mp, progress=False)
    assert sorted(report.files) == [f"model{i}-mp{mp}.safetensors" for i in range(mp)]
    assert report.dropped and all(name.startswith("model.layers.3.") for name in report.dropped)  # MTP layer
    ranks = [load_file(tmp_path / "mp" / f"model{i}-mp{mp}.safetensors") for i in range(mp)]
    local = config.n_routed_experts // mp
    for rank, tensors in enumerate(ranks):
        experts = {int(name.split(".")[4]) for name in tensors if ".ffn.experts." in name}
        assert experts == set(range(rank * local, (rank + 1) * local))
        assert not any(name.startswith("layers.3.") for name in tensors)
        # Sliced as DeepSeek's convert.py does: embed/head/wq_b/wkv_b/w1/w3 by rows, wo/w2 by columns.
        rows, cols = (slice(rank * n // mp, (rank + 1) * n // mp) for n in (512, 64))
        assert torch.equal(tensors["embed.weight"], state["model.embed_tokens.weight"][rows])
        assert torch.equal(tensors["head.weight"], state["lm_head.weight"][rows])
        o_proj = state["model.layers.1.self_attn.o_proj.weight"]
        assert torch.equal(tensors["layers.1.attn.wo.weight"], o_proj.chunk(mp, 1)[rank])
        down = state["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(tensors["layers.0.ffn.w2.weight"], down.chunk(mp, 1)[rank])
        assert torch.equal(tensors["layers.1.ffn.gate.bias"], state["model.layers.1.mlp.gate.e_score_correction_bias"])
        assert torch.equal(tensors["layers.1.attn.wq_a.weight"], state["model.layers.1.self_attn.q_a_proj.weight"])
        assert torch.equal(tensors["norm.weight"], state["model.norm.weight"])
        if local:
            e = rank * local
            expected = state[f"model.layers.2.mlp.experts.{e}.up_proj.weight"]
            assert torch.equal(tensors[f"layers.2.ffn.experts.{e}.w3.weight"], expected)

    convert_checkpoint(tmp_path / "mp", tmp_path / "back", verify=True, progress=False)
    back = read_all(tmp_path / "back")
    kept = {name: tensor for name, tensor in state.items() if not name.startswith("model.layers.3.")}
    assert set(back) == set(kept) and all(torch.equal(back[name], tensor) for name, tensor in kept.items())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_model_parallel_fp8_keeps_scales_as_dot_scale(tmp_path):
    # Every sliced dimension is a multiple of 128 per rank, so block scales split with their weights.
    config = DeepseekMoeConfig.from_preset(
        "tiny-v3", hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_attention_heads=4,
        qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, q_lora_rank=128, kv_lora_rank=128,
        n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, num_hidden_layers=2,
        num_nextn_predict_layers=0,
    )  # fmt: skip
    save_official(config, tmp_path / "official", seed=5)
    convert_checkpoint(tmp_path / "official", tmp_path / "fp8", target="fp8", progress=False)
    convert_checkpoint(tmp_path / "fp8", tmp_path / "mp", target="mp", mp=2, verify=True, progress=False)
    rank1 = load_file(tmp_path / "mp" / "model1-mp2.safetensors")
    assert rank1["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert rank1["layers.1.attn.wq_b.scale"].shape == (2, 1)  # 512 rows / 2 ranks, 128 columns
    assert rank1["layers.1.ffn.experts.3.w2.scale"].shape == (2, 2)
    convert_checkpoint(tmp_path / "mp", tmp_path / "back", target="fp8", verify=True, progress=False)
    fp8, back = read_all(tmp_path / "fp8"), read_all(tmp_path / "back")
    assert set(back) == set(fp8)
    assert all(torch.equal(back[n].view(torch.uint8), t.view(torch.uint8)) for n, t in fp8.items() if t.dim() == 2)


def test_model_parallel_refuses_what_it_cannot_represent(tmp_path):
    save_official(DeepseekMoeConfig.from_preset("tiny-16b"), tmp_path / "16b")
    with pytest.raises(ConversionError, match="multi-head attention"):
        convert_checkpoint(tmp_path / "16b", tmp_path / "mp", target="mp", mp=2, progress=False)
    save_official(DeepseekMoeConfig.from_preset("tiny-v3"), tmp_path / "v3")
    with pytest.raises(ConversionError, match="mp=3"):
        convert_checkpoint(tmp_path / "v3", tmp_path / "mp", target="mp", mp=3, progress=False)
    assert no_partial_output(tmp_path / "mp")


def test_resharding_follows_the_budget_and_writes_the_standard_index(tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100MB") == 10**8 and parse_size("1.5kb") == 1500
    with pytest.raises(ConversionError, match="decimal units"):
        parse_size("5GiB")
    config = DeepseekMoeConfig.from_preset("tiny-v2")
    state = save_official(config, tmp_path / "official")
    plan = plan_conversion(tmp_path / "official", dtype="bf16", max_shard_size="150KB")
    report = convert_checkpoint(tmp_path / "official", tmp_path / "out", dtype="bf16", max_shard_size="150KB")
    n = len(report.files)
    assert n > 2 and report.files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert report.files == [planned.name for planned in plan.files]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values())
    largest = max(t.numel() * 2 for t in state.values())
    for file in report.files:
        with safe_open(tmp_path / "out" / file, framework="pt") as shard:
            assert shard.metadata() == {"format": "pt"}
            size = sum(math.prod(shard.get_slice(k).get_shape()) * 2 for k in shard.keys())  # noqa: SIM118
            assert size <= max(150_000, largest)
            assert all(index["weight_map"][k] == file for k in shard.keys())  # noqa: SIM118
    report = convert_checkpoint(tmp_path / "out", tmp_path / "single", progress=False)
    assert report.files == ["model.safetensors"] and not (tmp_path / "single" / "model.safetensors.index.json").exists()


def measure_conversion_memory(tmp_path: Path, config: DeepseekMoeConfig, budget: str, verify: bool = False) -> None:
    """Converts a random fp32 checkpoint to bf16 in a fresh process and checks its peak RSS against
    baseline (imports) + shard budget + 2 × the largest tensor (fp32 source and its bf16 copy) + 64 MB. With `verify`
    the bound adds the per-tensor comparison (a third copy of the largest tensor) and the layer-by-layer logits check
    (3 × the largest layer in fp32: the layer, a stacked expert tensor being copied in, its parts), and must stay
    below one whole fp32 model (the verification used to load two); the child then warms up on a tiny checkpoint, so
    the lazily imported modules of verification are in its baseline."""
    size = write_random_checkpoint(tmp_path / "source", config, max_shard_size="100MB")
    source = Checkpoint.open(tmp_path / "source")
    largest = max(info.nbytes for info in source.tensors.values())
    warm_up = []
    if verify:
        write_random_checkpoint(tmp_path / "tiny", memory_config(vocab_size=256, moe_layers=1, experts=4))
        warm_up = [str(tmp_path / "tiny")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, str(CHILDREN / "child_conversion_memory.py"), str(tmp_path / "source"), str(tmp_path / "out"),
         budget, "verify" if verify else "convert", *warm_up],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    bound = parse_size(budget) + 2 * largest + 64 * 10**6
    if verify:
        bound += largest + 3 * largest_layer_bytes(source)
        assert bound < size, "the bound must be below one whole fp32 model"
    else:
        assert bound < size / 2, "the checkpoint must be large enough for the bound to mean something"
    assert rss["peak"] - rss["baseline"] <= bound, (rss, size, largest, bound)
    print(
        f"peak RSS {rss['peak'] / 1e6:.0f} MB = baseline {rss['baseline'] / 1e6:.0f} MB + "
        f"{(rss['peak'] - rss['baseline']) / 1e6:.0f} MB (bound {bound / 1e6:.0f} MB) for {size / 1e6:.0f} MB"
    )
    assert Checkpoint.open(tmp_path / "out").tensors.keys() == source.tensors.keys()


def memory_config(vocab_size: int, moe_layers: int, experts: int = 32) -> DeepseekMoeConfig:
    """About 16·vocab_size KB of embedding and head and 1.6·experts MB of fp32 experts per MoE layer."""
    return DeepseekMoeConfig.from_preset(
        "tiny-v2-lite", vocab_size=vocab_size, hidden_size=512, intermediate_size=2048, moe_intermediate_size=256,
        n_routed_experts=experts, num_hidden_layers=moe_layers + 1,
    )  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_is_bounded_by_shard_budget_and_largest_tensor(tmp_path):
    measure_conversion_memory(tmp_path, memory_config(vocab_size=8192, moe_layers=5), budget="50MB")  # ~300 MB


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_verify_runs_in_bounded_memory(tmp_path):
    config = memory_config(vocab_size=8192, moe_layers=12, experts=16)  # ~350 MB, 25 MB per MoE layer
    measure_conversion_memory(tmp_path, config, budget="50MB", verify=True)


def test_streamed_logits_match_the_loaded_model(tmp_path):
    """The layer-by-layer logits of `--verify` equal those of `from_pretrained` on an official FP8 checkpoint (fused
    experts, dequantization, MTP layer present but not run) and on a model with tied embeddings."""
    config = DeepseekMoeConfig.from_preset("tiny-v3", **EDGE_BLOCKS)
    tiny_model(config, seed=8).save_pretrained(tmp_path / "plain")
    fp8_state, _ = to_official_fp8(load_file(tmp_path / "plain" / "model.safetensors"))
    (tmp_path / "fp8").mkdir()
    write_sharded(fp8_state, tmp_path / "fp8", official_v3_config(config, quantization_config=QUANTIZATION_CONFIG))
    tied = DeepseekMoeConfig.from_preset("tiny-v2", tie_word_embeddings=True)
    tiny_model(tied, seed=9).save_pretrained(tmp_path / "tied")
    input_ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    for directory in ("fp8", "tied"):
        checkpoint = Checkpoint.open(tmp_path / directory)
        model = DeepseekMoeForCausalLM.from_pretrained(tmp_path / directory, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = model(input_ids).logits
        streamed = streamed_logits(checkpoint, model.config, input_ids)
        torch.testing.assert_close(streamed, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_on_a_one_gigabyte_checkpoint(tmp_path):
    measure_conversion_memory(tmp_path, memory_config(vocab_size=16384, moe_layers=19), budget="100MB")  # ~1.1 GB


def corrupt(kind: str, directory: Path) -> None:
    """One bad input per kind, made from a valid official FP8 directory."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if kind == "missing shard":
        (directory / "model-00002-of-00003.safetensors").unlink()
    elif kind in ("missing scale", "shape"):
        name = "model.layers.1.self_attn.o_proj.weight" + ("_scale_inv" if kind == "missing scale" else "")
        shard = directory / index["weight_map"][name]
        tensors = load_file(shard)
        if kind == "missing scale":
            del tensors[name], index["weight_map"][name]
        else:
            tensors[name] = torch.zeros(64, 32, dtype=torch.float8_e4m3fn)
        save_file(tensors, shard, metadata={"format": "pt"})
        index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        (
            "missing shard",
            {},
            "shard model-00002-of-00003.safetensors named in model.safetensors.index.json is missing",
        ),
        ("missing scale", {}, "FP8 tensor model.layers.1.self_attn.o_proj.weight has no .*_scale_inv"),
        ("shape", {}, r"o_proj.weight has shape \[64, 32\], the config implies \[64, 64\]"),
        ("dtype", {"dtype": "int4"}, "unknown dtype 'int4'"),
        ("disk", {}, "not enough disk space"),
    ],
)
def test_bad_input_gets_a_clear_error_and_leaves_no_output(tmp_path, monkeypatch, kind, options, message):
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=0)
    tiny_model(config).save_pretrained(tmp_path / "plain")
    fp8_state, _ = to_official_fp8(load_file(tmp_path / "plain" / "model.safetensors"))
    (tmp_path / "official").mkdir()
    write_sharded(fp8_state, tmp_path / "official", official_v3_config(config, quantization_config=QUANTIZATION_CONFIG))
    corrupt(kind, tmp_path / "official")
    if kind == "disk":  # 1 kB free
        monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12, free=1000))
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(tmp_path / "official", tmp_path / "out", progress=False, **options)
    assert no_partial_output(tmp_path / "out")
    cli_options = ["--dtype", options["dtype"]] if options else []
    assert main(["convert", str(tmp_path / "official"), str(tmp_path / "out"), "--no-progress", *cli_options]) == 2
    assert no_partial_output(tmp_path / "out")


def test_converted_checkpoint_loads_as_remote_code(tmp_path):
    config = DeepseekMoeConfig.from_preset("tiny-v2")
    save_official(config, tmp_path / "official")
    convert_checkpoint(tmp_path / "official", tmp_path / "out", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, str(CHILDREN / "child_remote_code_logits.py"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = DeepseekMoeForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([[1, 2, 3]])).logits.sum().item()
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-6)


def test_verify_catches_a_corrupted_output(tmp_path):
    save_official(DeepseekMoeConfig.from_preset("tiny-v2"), tmp_path / "official")
    plan = plan_conversion(tmp_path / "official", target="fp8")
    convert_checkpoint(tmp_path / "official", tmp_path / "out", target="fp8", progress=False)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="experts.5.down_proj.weight .* does not match the source"):
        verify_conversion(plan, tmp_path / "out")


def test_cli_convert_and_dry_run(tmp_path, capsys):
    save_official(DeepseekMoeConfig.from_preset("tiny-v3"), tmp_path / "official")
    assert (
        main(["convert", str(tmp_path / "official"), str(tmp_path / "plan"), "--dry-run", "--to", "mp", "--mp", "2"])
        == 0
    )
    assert "model1-mp2.safetensors" in capsys.readouterr().out and not (tmp_path / "plan").exists()
    args = ["convert", str(tmp_path / "official"), str(tmp_path / "out"), "--to", "fp8", "--drop-mtp", "--verify"]
    assert main([*args, "--max-shard-size", "300KB", "--no-progress"]) == 0
    assert "verified, logits checked" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert main([*args, "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_conversion_writes_a_record_for_the_model_card(tmp_path):
    from deepseek_moe.conversion.convert import convert_checkpoint
    from deepseek_moe.remote_code import CONVERSION_RECORD

    config = DeepseekMoeConfig.from_preset("tiny-v2-lite")
    tiny_model(config).save_pretrained(tmp_path / "source")
    convert_checkpoint(tmp_path / "source", tmp_path / "out", dtype="bf16", progress=False)
    record = json.loads((tmp_path / "out" / CONVERSION_RECORD).read_text())
    assert record["source"] == "source" and record["dtype"] == "bfloat16"  # no local path to publish
    assert str(tmp_path) not in (tmp_path / "out" / CONVERSION_RECORD).read_text()
    assert record["target"] == "deepseek_moe" and record["mtp"] == "kept"
