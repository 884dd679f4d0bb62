"""Official FP8 checkpoints (e4m3 weights, 128×128 `weight_scale_inv` blocks with partial edge blocks, MTP layer,
several shards) load in float32, bfloat16, float16 and "auto" into a model entirely in that dtype (the router's fp32
weight and bias and the RoPE frequencies excepted, by design), equal to dequantizing in fp32 and then casting.

The reference is independent of the loader: `checkpoint_utils` quantizes with a naive block loop and dequantizes with
its own expansion, and those fp32 weights load through the plain (non-FP8) path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from checkpoint_utils import QUANTIZATION_CONFIG, read_files, write_fp8_checkpoint

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.cli import main
from deepseek_moe.hub import HIDE_PACKAGE
from deepseek_moe.remote_code import AUTO_MAP, remote_code_files

# Kept in fp32 whatever the load dtype: the router (design: routing in fp32) and RoPE's inverse frequencies.
FP32_BY_DESIGN = ("mlp.gate.weight", "e_score_correction_bias", "inv_freq", "original_inv_freq")
# Largest logit error allowed against the fp32 reference, relative to the largest logit.
LOGIT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}
INPUT_IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """Experts of 32 rows: partial 128-blocks everywhere (kept-FP8 loading dequantizes such experts)."""
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8"))


def load(folder, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # leftover scales or unexpected MTP keys would warn
        model, info = DeepseekMoeForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("requested", ["float32", "bfloat16", "float16", "auto"])
def test_fp8_checkpoint_loads_entirely_in_the_requested_dtype(fp8_checkpoint, requested):
    folder, reference = fp8_checkpoint
    model = load(folder, requested if requested == "auto" else getattr(torch, requested))
    dtype = torch.bfloat16 if requested == "auto" else getattr(torch, requested)  # "auto": the config's bf16
    assert model.config.dtype == dtype and not model.is_quantized
    assert not hasattr(model.config, "quantization_config")  # dequantized: it saves as a plain checkpoint

    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == (torch.float32 if name.endswith(FP32_BY_DESIGN) else dtype), name
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name  # dequantized in fp32, then cast
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            assert buffer.dtype == (torch.float32 if name.endswith(FP32_BY_DESIGN) else dtype), name

    with torch.no_grad():
        ours, fp32 = model(INPUT_IDS).logits, reference(INPUT_IDS).logits
    assert ours.dtype == dtype
    assert (ours.float() - fp32).abs().max() <= LOGIT_TOLERANCE[dtype] * fp32.abs().max()
    generated = model.generate(INPUT_IDS[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)
    if dtype == torch.float32:
        assert torch.equal(generated, reference.generate(INPUT_IDS[:1], max_new_tokens=4, do_sample=False))


def test_generate_cli_runs_on_an_fp8_folder_in_its_own_dtype(fp8_checkpoint, capsys):
    folder, _ = fp8_checkpoint
    assert main(["generate", str(folder), "--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out.split()
    model = load(folder, "auto")
    expected = model.generate(torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=4, do_sample=False)[0, 5:]
    assert printed == [str(t) for t in expected.tolist()]


@pytest.fixture(scope="module")
def ue8m0_checkpoint(tmp_path_factory):
    """DeepSeek-V3.1's form: `"scale_fmt": "ue8m0"` in the `quantization_config`, every weight scale a power of two."""
    return write_fp8_checkpoint(tmp_path_factory.mktemp("ue8m0"), scale_fmt="ue8m0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ue8m0_checkpoint_loads_dequantized_as_its_dequantized_weights(ue8m0_checkpoint, dtype):
    """Power-of-two weight scales dequantize like any others: the model equals the one built from the independently
    dequantized weights in the same dtype, weights and logits bit for bit."""
    folder, _ = ue8m0_checkpoint
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    scales = [t for name, t in read_files(folder).items() if name.endswith("_scale_inv")]
    assert scales and all(torch.equal(s, torch.exp2(torch.log2(s).round())) for s in scales)  # powers of two
    model = load(folder, dtype)
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    expected = DeepseekMoeForCausalLM.from_pretrained(folder.parent / "reference", dtype=dtype).eval()
    assert model.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(t, expected.state_dict()[name]) for name, t in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(INPUT_IDS).logits, expected(INPUT_IDS).logits)


REMOTE_CODE_CHILD = (
    HIDE_PACKAGE
    + """
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype="auto")
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
kept = ("mlp.gate.weight", "e_score_correction_bias")
wrong = [n for n, t in model.state_dict().items() if t.dtype != (torch.float32 if n.endswith(kept) else torch.bfloat16)]
assert not wrong, wrong
with torch.no_grad():
    print(model(torch.tensor([[3, 1, 4, 1, 5]])).logits.float().sum().item())
"""
)


@pytest.fixture(scope="module")
def remote_code_fp8_folder(fp8_checkpoint, tmp_path_factory):
    """The FP8 checkpoint as a folder of our model type with the remote code beside it (as `convert --to fp8`
    writes)."""
    folder, _ = fp8_checkpoint
    tmp_path = tmp_path_factory.mktemp("remote")
    config = json.loads((folder / "config.json").read_text())
    loaded = DeepseekMoeConfig.from_pretrained(folder)
    assert loaded.to_dict()["quantization_config"] == QUANTIZATION_CONFIG  # written back in DeepSeek's form
    for path in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        shutil.copyfile(path, tmp_path / path.name)  # upload publishes only files inside the folder
    for path in remote_code_files():
        (tmp_path / path.name).write_text(path.read_text())
    config.update(model_type="deepseek_moe", auto_map=AUTO_MAP)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_fp8_folder_loads_as_remote_code_in_its_own_dtype(remote_code_fp8_folder):
    """The quantizer ships with the remote code: it loads where this package is not installed."""
    tmp_path = remote_code_fp8_folder
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path.parent / "modules"), HF_HUB_OFFLINE="1")
    child = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_CODE_CHILD, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert child.returncode == 0, child.stderr[-3000:]
    with torch.no_grad():
        expected = load(tmp_path, "auto")(torch.tensor([[3, 1, 4, 1, 5]])).logits.float().sum().item()
    assert float(child.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_upload_dry_run_accepts_an_fp8_folder(remote_code_fp8_folder, capsys):
    """`upload --dry-run` loads the staged folder as remote code in a fresh interpreter (~30 s here)."""
    tmp_path = remote_code_fp8_folder

    assert main(["upload", str(tmp_path), "tester/fp8", "--dry-run"]) == 0
    assert "dry run: nothing was sent" in capsys.readouterr().out
