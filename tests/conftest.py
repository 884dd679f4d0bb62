"""Shared helpers: fully randomized tiny models and transformers' built-in DeepSeek configs for the same shapes."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# Triton kernels run through Triton's CPU interpreter when no GPU is present; it must be chosen before triton (and so
# the model code, which imports it when available) is imported.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import DeepseekV2Config, DeepseekV3Config  # noqa: E402
from transformers.utils import logging  # noqa: E402

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM  # noqa: E402
from deepseek_moe.hub import HIDE_PACKAGE  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
logging.disable_progress_bar()

# `python -I -c REMOTE_CODE_LOGITS MODEL PROMPT OUT`: loads MODEL (folder or repo) with trust_remote_code=True where
# `deepseek_moe` cannot be imported, saves its logits on PROMPT to OUT and prints the class's module.
REMOTE_CODE_LOGITS = HIDE_PACKAGE + (
    "import torch\n"
    "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
    "with torch.no_grad():\n"
    "    torch.save(model(torch.tensor(eval(sys.argv[2]))).logits, sys.argv[3])\n"
    "print(type(model).__module__)\n"
)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and float buffer (norms, router, correction bias) random values, so that a weight loaded
    into the wrong place, a skipped norm or an ignored bias changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or "inv_freq" in name:
            continue
        if "e_score_correction_bias" in name:
            values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 0.4 - 0.2
        elif tensor.dim() == 1:
            values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) + 0.5
        else:
            std = 1.5 / tensor.shape[-1] ** 0.5 if name.endswith("gate.weight") else 0.7 / tensor.shape[-1] ** 0.5
            values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
        tensor.copy_(values.to(tensor.dtype))
    return model


def tiny_model(
    preset: str | DeepseekMoeConfig = "tiny-v3", seed: int = 0, model_class: type = DeepseekMoeForCausalLM, **overrides
) -> torch.nn.Module:
    """The tests' one model factory: a preset (with `overrides`) or a config, every parameter and float buffer random
    (`randomize_`)."""
    config = preset if isinstance(preset, DeepseekMoeConfig) else DeepseekMoeConfig.from_preset(preset, **overrides)
    return randomize_(model_class(config), seed=seed)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """The tests' one closeness check: max |actual − expected| <= rtol · max |expected|, i.e. relative to the largest
    reference entry (the scale of the logits or activations compared), computed in the reference's dtype."""
    error = (actual.to(device=expected.device, dtype=expected.dtype) - expected).abs().max().item()
    scale = expected.abs().max().item()
    where = f"{what}: " if what else ""
    assert error <= rtol * scale, f"{where}max |Δ| {error:.3g} > {rtol:g} × max |reference| {scale:.3g}"


_SHARED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "n_shared_experts",
    "n_routed_experts",
    "routed_scaling_factor",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "v_head_dim",
    "qk_nope_head_dim",
    "n_group",
    "topk_group",
    "num_experts_per_tok",
    "first_k_dense_replace",
    "norm_topk_prob",
    "max_position_embeddings",
    "rms_norm_eps",
    "pad_token_id",
)


def builtin_config(config: DeepseekMoeConfig) -> DeepseekV2Config | DeepseekV3Config:
    """transformers' built-in config describing the same architecture as one of our MLA configs."""
    values = {key: getattr(config, key) for key in _SHARED_KEYS}
    values["rope_parameters"] = dict(config.rope_parameters)
    if config.uses_bias_balancing:
        return DeepseekV3Config(**values, rope_interleave=config.rope_interleave, num_mtp_layers=0)
    return DeepseekV2Config(**values, topk_method=config.topk_method)


@pytest.fixture
def tmp_dir(tmp_path):
    return str(tmp_path)


class CausalLMRows(torch.utils.data.Dataset):
    """Rows of token ids as a Trainer dataset: each row is its own input and labels."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def file_tree(directory: Path) -> dict[str, str]:
    """Every entry under `directory`: files by the sha256 of their bytes, symlinks by their target; equal trees mean
    nothing was written, deleted or re-pointed."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        key = path.relative_to(directory).as_posix()
        if path.is_symlink():
            entries[key] = "-> " + os.readlink(path)
        elif path.is_file():
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries
