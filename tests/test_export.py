"""Saved folders load where users load them: our `save_pretrained` folder with `trust_remote_code=True` where the
package is not installed, and the official-format export in transformers' built-in DeepSeek-V2/V3 classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REMOTE_CODE_LOGITS, randomize_
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.remote_code import AUTO_MAP, remote_code_files

PROMPT = [[3, 14, 15, 92, 65, 35, 89, 79]]
SMALL_MOE = {"n_routed_experts": 4, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2}


def _logits(model, prompt=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(prompt)).logits


def _assert_clean(info: dict) -> None:
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


@pytest.mark.parametrize(
    ("preset", "builtin", "model_type"),
    [("tiny-v3", DeepseekV3ForCausalLM, "deepseek_v3"), ("tiny-v2", DeepseekV2ForCausalLM, "deepseek_v2")],
)
def test_official_export_loads_in_transformers_builtin(tmp_path, preset, builtin, model_type):
    config = DeepseekMoeConfig.from_preset(preset, num_nextn_predict_layers=0)
    model = randomize_(DeepseekMoeForCausalLM(config), seed=2).eval()
    model.save_pretrained(tmp_path, official_format=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == model_type and saved["architectures"] == [builtin.__name__]
    assert "auto_map" not in saved and not list(tmp_path.glob("*.py"))
    reference, info = builtin.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean(info)
    assert type(reference) is builtin
    torch.testing.assert_close(_logits(reference.eval()), _logits(model), rtol=1e-5, atol=1e-5)


def test_official_v3_export_with_mtp_at_layer_61(tmp_path):
    """transformers' V3 ignores checkpoint keys under `model.layers.61` only (V3's own MTP depth): a 61-layer model
    exports its MTP module there, as DeepSeek does, and loads with nothing missing or unexpected."""
    config = DeepseekMoeConfig.from_preset(
        "tiny-v3", num_hidden_layers=61, num_nextn_predict_layers=1, hidden_size=16, q_lora_rank=16, **SMALL_MOE
    )
    model = randomize_(DeepseekMoeForCausalLM(config), seed=3).eval()
    model.save_pretrained(tmp_path, official_format=True)
    reference, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean(info)
    torch.testing.assert_close(_logits(reference.eval()), _logits(model), rtol=1e-5, atol=1e-5)
    reloaded, info = DeepseekMoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean(info)  # and ours reads the export back, MTP module included
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_official_16b_export_names_deepseeks_remote_code(tmp_path):
    config = DeepseekMoeConfig.from_preset("tiny-16b")
    randomize_(DeepseekMoeForCausalLM(config)).save_pretrained(tmp_path, official_format=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek" and saved["architectures"] == ["DeepseekForCausalLM"]
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek.DeepseekForCausalLM"
    assert saved["auto_map"]["AutoConfig"] == "configuration_deepseek.DeepseekConfig"
    assert saved["rope_scaling"] is None and "rope_theta" in saved


def test_saved_folder_loads_as_remote_code_without_the_package(tmp_path):
    model = randomize_(DeepseekMoeForCausalLM(DeepseekMoeConfig.from_preset("tiny-v3")), seed=4).eval()
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP
    assert sorted(p.name for p in (tmp_path / "model").glob("*.py")) == [p.name for p in remote_code_files()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [
        sys.executable,
        "-I",
        "-c",
        REMOTE_CODE_LOGITS,
        str(tmp_path / "model"),
        repr(PROMPT),
        str(tmp_path / "logits.pt"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("transformers_modules.")
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), _logits(model), rtol=1e-6, atol=1e-6)
