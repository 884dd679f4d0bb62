"""Writers of official-looking DeepSeek checkpoints (configs as DeepSeek ships them, FP8 block quantization, index
shards), shared by the loading and conversion tests. The quantizer is a deliberately naive loop: it is the
independent reference the package's vectorized one is checked against."""

from __future__ import annotations

import json
import math

import torch
from conftest import randomize_
from safetensors.torch import load_file, save_file

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM

BLOCK = 128
# Partial 128-blocks: kv_a_proj_with_mqa has 136 + 8 = 144 rows, the dense MLP 200, every input 136 columns.
EDGE_BLOCKS = dict(hidden_size=136, intermediate_size=200, kv_lora_rank=136, num_nextn_predict_layers=1)
# Weights an official FP8 checkpoint keeps in bf16.
NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "shared_head.head")
QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


OFFICIAL_ARCHITECTURES = {
    "deepseek": "DeepseekForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def official_v3_config(config: DeepseekMoeConfig, **extra) -> dict:
    """A config.json as DeepSeek ships it (model_type deepseek_v3, rope_scaling, auto_map, ...)."""
    keys = [
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_nextn_predict_layers", "num_attention_heads", "num_key_value_heads", "n_shared_experts",
        "n_routed_experts", "routed_scaling_factor", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
        "qk_nope_head_dim", "topk_method", "n_group", "topk_group", "num_experts_per_tok", "moe_layer_freq",
        "first_k_dense_replace", "norm_topk_prob", "scoring_func", "aux_loss_alpha", "seq_aux",
        "max_position_embeddings", "rms_norm_eps",
    ]  # fmt: skip
    rope = {k: v for k, v in config.rope_parameters.items() if k not in ("rope_type", "rope_theta")}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
        "ep_size": 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rope_theta": 10000,
        "rope_scaling": rope,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        **{k: getattr(config, k) for k in keys},
        **extra,
    }


def official_config(config: DeepseekMoeConfig) -> dict:
    """config.json in the official family's form: `model_type` deepseek / deepseek_v2 / deepseek_v3, the RoPE
    settings as `rope_theta` + `rope_scaling`, none of our derived keys."""
    values = json.loads(config.to_json_string())
    rope = values.pop("rope_parameters")
    for key in ("head_dim", "rope_interleave", "architectures"):
        values.pop(key, None)
    values["rope_theta"] = rope.pop("rope_theta")
    rope.pop("rope_type", None)
    values["rope_scaling"] = rope if rope.get("type", "default") != "default" else None
    family = config.official_model_type
    return {**values, "model_type": family, "architectures": [OFFICIAL_ARCHITECTURES[family]]}


def quantize_fp8(weight: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """128×128 block FP8 (e4m3) with amax/448 scales, for `scale_fmt="ue8m0"` rounded up to a power of two (ceil of
    log2 taken in float64, exact for an fp32 scale); edge blocks are partial."""
    rows, cols = weight.shape
    scale = torch.empty(math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = weight[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].float()
            scale[i, j] = block.abs().max().clamp(min=1e-4) / 448.0
            if scale_fmt == "ue8m0":
                scale[i, j] = 2.0 ** math.ceil(math.log2(scale[i, j].item()))
            quantized[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / scale[i, j]).to(
                torch.float8_e4m3fn
            )
    return quantized, scale


def dequantize(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = quantized.shape
    return quantized.float() * scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


def to_official_fp8(
    state: dict[str, torch.Tensor], scale_fmt: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(FP8 checkpoint as DeepSeek ships it, the dequantized weights it stands for)."""
    fp8_state, dequantized = {}, {}
    for name, tensor in state.items():
        if tensor.dim() == 2 and not any(key in name for key in NOT_QUANTIZED):
            quantized, scale = quantize_fp8(tensor, scale_fmt)
            fp8_state[name], fp8_state[name + "_scale_inv"] = quantized, scale
            dequantized[name] = dequantize(quantized, scale)
        else:
            fp8_state[name] = dequantized[name] = tensor.to(torch.bfloat16) if tensor.dim() == 2 else tensor
    return fp8_state, dequantized


def write_sharded(state: dict[str, torch.Tensor], directory, config: dict, shards: int = 3) -> None:
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name].contiguous() for name in names[i::shards]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    (directory / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))


def read_files(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, by name."""
    return {name: t for path in folder.glob("*.safetensors") for name, t in load_file(path).items()}


def write_fp8_checkpoint(root, scale_fmt: str | None = None, **overrides):
    """(FP8 folder as DeepSeek ships it: tiny V3 with MTP, partial blocks, 3 shards; fp32 reference model on the
    independently dequantized weights). `scale_fmt="ue8m0"`: as DeepSeek-V3.1 ships it, power-of-two weight scales
    and `"scale_fmt": "ue8m0"` in its `quantization_config` (activations then take power-of-two scales too)."""
    config = DeepseekMoeConfig.from_preset("tiny-v3", **EDGE_BLOCKS, **overrides)
    randomize_(DeepseekMoeForCausalLM(config), seed=7).save_pretrained(root / "source")
    fp8_state, dequantized = to_official_fp8(load_file(root / "source" / "model.safetensors"), scale_fmt)
    assert fp8_state["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)
    assert fp8_state["model.layers.1.mlp.experts.0.down_proj.weight"].dtype == torch.float8_e4m3fn
    (root / "fp8").mkdir()
    quantization = QUANTIZATION_CONFIG if scale_fmt is None else {**QUANTIZATION_CONFIG, "scale_fmt": scale_fmt}
    write_sharded(fp8_state, root / "fp8", official_v3_config(config, quantization_config=quantization))
    (root / "reference").mkdir()
    save_file({k: v.float().contiguous() for k, v in dequantized.items()}, root / "reference" / "model.safetensors")
    (root / "reference" / "config.json").write_text(json.dumps(official_v3_config(config)))
    reference = DeepseekMoeForCausalLM.from_pretrained(root / "reference", dtype=torch.float32).eval()
    return root / "fp8", reference
