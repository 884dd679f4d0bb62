"""The command line imports only what a command needs, and the converter's expected shapes (computed from the config,
without the model code) equal the model's own saved layout."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.conversion.layouts import expected_shapes
from deepseek_moe.presets import PRESETS

HEAVY_FOR_HELP = ("torch", "transformers", "huggingface_hub", "triton", "safetensors")
# A conversion needs headers, plain config values and (only when it changes bytes) torch: no transformers at all.
HEAVY_FOR_CONVERT = ("transformers", "accelerate", "deepseek_moe.model.configuration_deepseek_moe", "triton", "peft")


def _imported_modules(*arguments: str) -> set[str]:
    """Every module `python -X importtime -m deepseek_moe.cli ARGUMENTS` imports (importtime's report on stderr)."""
    command = [sys.executable, "-X", "importtime", "-m", "deepseek_moe.cli", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # the first line is the header


@pytest.mark.parametrize("arguments", [("--help",), ("convert", "--help")])
def test_help_imports_no_heavy_package(arguments):
    modules = _imported_modules(*arguments)
    assert "deepseek_moe.dtypes" in modules  # the command line ran (it is `__main__` itself; it imports dtypes)
    assert not {name for name in modules if name.split(".")[0] in HEAVY_FOR_HELP}


@pytest.mark.parametrize(
    ("arguments", "needs_torch"),
    [((), False), (("--to", "mp"), False), (("--dtype", "bf16"), True), (("--to", "fp8"), True)],
    ids=["copy to ours", "copy to mp", "cast", "quantize"],
)
def test_conversion_imports_no_transformers_and_torch_only_to_compute(tmp_path, arguments, needs_torch):
    """A conversion whose tensors keep their bytes (a reshard, DeepSeek's inference format) imports no torch; one that
    casts or quantizes does; none imports transformers, the model code or triton. (Dequantizing an FP8 source is the
    one conversion that imports transformers: the block math lives in the model's quantizer module.)"""
    model = DeepseekMoeForCausalLM(DeepseekMoeConfig.from_preset("tiny-v3"))
    model.save_pretrained(tmp_path / "source")
    modules = _imported_modules("convert", str(tmp_path / "source"), str(tmp_path / "out"), *arguments)
    assert (tmp_path / "out" / "config.json").is_file()
    assert "deepseek_moe.conversion.convert" in modules and ("torch" in modules) == needs_torch
    assert not {name for name in modules if name in HEAVY_FOR_CONVERT or name.split(".")[0] in HEAVY_FOR_CONVERT}


VARIANTS = [
    *[(preset, {}) for preset in PRESETS],
    ("tiny-v3", {"attention_bias": True, "tie_word_embeddings": True, "moe_layer_freq": 2, "num_hidden_layers": 4}),
    ("tiny-v2", {"q_lora_rank": None, "n_shared_experts": 0}),
    ("tiny-16b", {"attention_bias": True, "num_key_value_heads": 2}),
]


@pytest.mark.parametrize(("preset", "overrides"), VARIANTS)
def test_expected_shapes_equal_the_saved_meta_model(preset, overrides):
    config = DeepseekMoeConfig.from_preset(preset, **overrides)
    with torch.device("meta"):
        model = DeepseekMoeForCausalLM(config)
    saved = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    shapes, optional = expected_shapes(config)
    required = {name: shape for name, shape in shapes.items() if name not in optional}
    assert required == {name: tuple(tensor.shape) for name, tensor in saved.items()}
    mtp = range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers)
    assert optional == {f"model.layers.{k}.{name}.weight" for k in mtp for name in ("embed_tokens", "shared_head.head")}
