"""Named architectures: the four official DeepSeek configurations and small ones with every structural feature of
their family, for tests and the demo. Plain data, so the command line can list them without importing transformers;
kept outside the model folder, which ships as Hub remote code."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import DeepseekMoeConfig
    from .model.architecture_deepseek_moe import DeepseekMoeValues

_YARN = {
    "type": "yarn",
    "factor": 40,
    "beta_fast": 32,
    "beta_slow": 1,
    "original_max_position_embeddings": 4096,
}

# What every small preset shares: three layers (one dense), 64 wide, a 512-token vocabulary.
_TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "first_k_dense_replace": 1,
}
# Small MLA (V2/V3): latent 32, query LoRA 48, 16 + 8 rotary query/key dims, 16 experts in 4 groups, top-4 of 2 groups.
_TINY_MLA = {
    **_TINY,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "max_position_embeddings": 163840,
}

# Official values (reference §2.1). The small presets keep every structural feature of their family. Each preset is
# written as an official config.json of its family would be: `model_type` (`deepseek`, `deepseek_v2`, `deepseek_v3`)
# supplies that family's defaults for the keys left out (`normalize_config_dict`).
PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-moe-16b": {
        "model_type": "deepseek",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 163840,
        "rope_scaling": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
    "deepseek-v2": {
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "n_routed_experts": 160,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 8,
        "topk_group": 3,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 16.0,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 163840,
        "rope_scaling": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
    "deepseek-v3": {
        "model_type": "deepseek_v3",
        "num_nextn_predict_layers": 1,
        "max_position_embeddings": 163840,
        "rope_scaling": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    "tiny-16b": {
        **_TINY,
        "model_type": "deepseek",
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "max_position_embeddings": 512,
    },
    "tiny-v2-lite": {
        **_TINY_MLA,
        "model_type": "deepseek_v2",
        "q_lora_rank": None,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "n_group": 1,
        "topk_group": 1,
        "rope_scaling": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
    "tiny-v2": {
        **_TINY_MLA,
        "model_type": "deepseek_v2",
        "n_shared_experts": 2,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 16.0,
        "rope_scaling": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
    "tiny-v3": {
        **_TINY_MLA,
        "model_type": "deepseek_v3",
        "num_nextn_predict_layers": 1,
        "n_shared_experts": 1,
        "rope_scaling": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
}

# Presets small enough to build, train and run on a laptop CPU.
SMALL_PRESETS = tuple(name for name in PRESETS if name.startswith("tiny-"))


def from_preset(cls: type[DeepseekMoeConfig], name: str, **overrides: Any) -> DeepseekMoeConfig:
    """An official configuration (`deepseek-moe-16b`, `deepseek-v2-lite`, `deepseek-v2`, `deepseek-v3`) or a
    small one for tests and demos (`tiny-16b`, `tiny-v2-lite`, `tiny-v2`, `tiny-v3`). Bound to the config class as
    `DeepseekMoeConfig.from_preset` when the package is imported."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    values = copy.deepcopy(PRESETS[name])
    if "rope_parameters" in overrides:  # replaces the preset's official-style `rope_scaling`
        values.pop("rope_scaling", None)
    values.update(overrides)
    return cls.from_dict(values)


def load_config(preset_or_path: str | os.PathLike) -> DeepseekMoeConfig:
    """The one way tooling reads an architecture: a preset name, a config.json file or a directory holding one
    (ours or an official DeepSeek one). Anything else, or an invalid config, is a `ValueError` saying what is wrong."""
    from .model import DeepseekMoeConfig

    path = _config_file(preset_or_path)
    if path is None:
        return DeepseekMoeConfig.from_preset(os.fspath(preset_or_path))
    try:
        return DeepseekMoeConfig.from_pretrained(path)
    except (OSError, TypeError) as error:  # unreadable file, JSON that is not an object
        raise ValueError(f"{path}: not a readable config.json ({error})") from error


def load_values(preset_or_path: str | os.PathLike) -> DeepseekMoeValues:
    """`load_config` without transformers: the same sources, normalisation and checks (`hidden_act` aside, whose
    choices are transformers' activations), as plain values (for conversion)."""
    from .model.architecture_deepseek_moe import DeepseekMoeValues

    path = _config_file(preset_or_path)
    if path is None:
        return DeepseekMoeValues.from_dict(copy.deepcopy(PRESETS[os.fspath(preset_or_path)]))
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable config.json ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: not a readable config.json (a JSON {type(values).__name__}, not an object)")
    return DeepseekMoeValues.from_dict(values)


def _config_file(preset_or_path: str | os.PathLike) -> str | None:
    """The config.json a name means (a local path wins over a preset of the same name, as in transformers), or None
    for a preset; anything else is a `ValueError`."""
    name = os.fspath(preset_or_path)
    for path in (name, os.path.join(name, "config.json")):
        if os.path.isfile(path):
            return path
    if name in PRESETS:
        return None
    raise ValueError(
        f"{name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config.json or a directory with one"
    )


__all__ = ["PRESETS", "SMALL_PRESETS", "from_preset", "load_config", "load_values"]
