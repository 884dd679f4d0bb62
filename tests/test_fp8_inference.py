"""FP8 kept in memory: an official FP8 checkpoint (tiny V3 with MTP, partial 128-blocks, 3 shards) loaded with
`DeepseekFp8Config(dequantize=False)` holds the files' E4M3 weights and fp32 block scales bit for bit, in about half
the bytes of bf16, runs like the dequantized model, refuses training, and saves the official FP8 layout back.

References are independent of the kept path: the files themselves (read with safetensors), the dequantized model of
`test_fp8_loading` (itself checked against `checkpoint_utils`' naive block loop) and shapes. The CPU tests run with the
Triton kernels switched off (`torch_path`: a machine where they do not run); the kernel tests run them on a GPU when
there is one, else under Triton's interpreter (which conftest selects on machines without a GPU)."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from checkpoint_utils import QUANTIZATION_CONFIG, dequantize, read_files, write_fp8_checkpoint
from conftest import assert_close
from transformers import Trainer, TrainingArguments

import deepseek_moe.model.fp8_kernels as fp8_kernels
from deepseek_moe import DeepseekMoeForCausalLM
from deepseek_moe.hub import HIDE_PACKAGE
from deepseek_moe.model.quantization_deepseek_moe import DeepseekFp8Config, DeepseekFp8Linear, keeps_fp8_on

E4M3 = torch.float8_e4m3fn
BLOCK = 128
INPUT_IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
EXPERT_WEIGHT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
# Held in fp32 whatever the load dtype (routing in fp32 by design).
FP32_BY_DESIGN = ("mlp.gate.weight", "e_score_correction_bias")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Experts of 128 rows (whole blocks), so that they stay FP8 as well."""
    return write_fp8_checkpoint(tmp_path_factory.mktemp("kept"), moe_intermediate_size=BLOCK)


@pytest.fixture
def torch_path(monkeypatch):
    """A machine where the FP8 Triton kernels do not run: kept weights are dequantized one at a time instead."""
    monkeypatch.setattr(fp8_kernels, "fp8_gemm_runs_on", lambda device: False)


def load(folder, dequantize: bool | None, dtype=torch.bfloat16, **kwargs):
    config = DeepseekFp8Config(dequantize=dequantize)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # leftover scales or ignored loading attributes would warn
        model, info = DeepseekMoeForCausalLM.from_pretrained(
            folder, dtype=dtype, quantization_config=config, output_loading_info=True, **kwargs
        )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """E4M3 tensors compared by their bytes (torch.equal does not compare float8 values)."""
    return tensor.view(torch.uint8) if tensor.dtype == E4M3 else tensor


def held_fp8(model, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's E4M3 weight and fp32 scales standing for the file tensor `name`: a linear's own parameters, or
    an expert's rows of the fused tensors (gate_up_proj: gate's rows then up's; scales likewise by 128-row block)."""
    match = EXPERT_WEIGHT.fullmatch(name)
    if match is None:
        return model.get_parameter(name), model.get_parameter(name + "_scale_inv")
    experts, expert, projection = match.group(1), int(match.group(2)), match.group(3)
    if projection == "down":
        fused = f"{experts}.down_proj"
        return model.get_parameter(fused)[expert], model.get_parameter(fused + "_scale_inv")[expert]
    rows = model.config.moe_intermediate_size
    part = 0 if projection == "gate" else 1
    weight = model.get_parameter(f"{experts}.gate_up_proj")[expert, part * rows : (part + 1) * rows]
    scale = model.get_parameter(f"{experts}.gate_up_proj_scale_inv")[expert]
    return weight, scale[part * rows // BLOCK : (part + 1) * rows // BLOCK]


def test_kept_fp8_holds_the_files_e4m3_weights_and_scales_bit_exact(checkpoint, torch_path):
    folder, _ = checkpoint
    model = load(folder, dequantize=False)
    assert model.is_quantized and model.config._experts_implementation == "deepseek_fp8"
    files = read_files(folder)
    fp8_names = [name.removesuffix("_scale_inv") for name in files if name.endswith("_scale_inv")]
    assert any("layers.3.eh_proj" in name for name in fp8_names)  # the MTP layer (layer 3) too
    for name in fp8_names:
        weight, scale = held_fp8(model, name)
        assert weight.dtype == E4M3 and torch.equal(bits(weight), bits(files[name])), name
        assert scale.dtype == torch.float32 and torch.equal(scale, files[name + "_scale_inv"]), name
    assert isinstance(model.model.layers[3].eh_proj, DeepseekFp8Linear)
    # Every E4M3 tensor of the model is accounted for: one per FP8 linear, two per experts module.
    linears = [n for n in fp8_names if not EXPERT_WEIGHT.fullmatch(n)]
    moe_layers = {EXPERT_WEIGHT.fullmatch(n).group(1) for n in fp8_names if EXPERT_WEIGHT.fullmatch(n)}
    e4m3 = [n for n, p in model.named_parameters() if p.dtype == E4M3]
    assert len(e4m3) == len(linears) + 2 * len(moe_layers) and len(moe_layers) == 3
    for name, parameter in model.named_parameters():
        if parameter.dtype != E4M3 and not name.endswith("_scale_inv"):
            assert parameter.dtype == (torch.float32 if name.endswith(FP32_BY_DESIGN) else torch.bfloat16), name
    assert not any(p.requires_grad for n, p in model.named_parameters() if p.dtype == E4M3 or "scale_inv" in n)


def test_kept_fp8_takes_about_half_the_memory_of_bf16(checkpoint, torch_path):
    """Sum of parameter bytes, against the count from shapes: an FP8 [r, c] matrix costs r·c bytes plus 4 per 128×128
    block (its fp32 scale) where bf16 costs 2·r·c; everything else is held as in the bf16 model."""
    folder, _ = checkpoint
    kept, bf16 = load(folder, dequantize=False), load(folder, dequantize=True)
    kept_fp8 = {n for n, p in kept.named_parameters() if p.dtype == E4M3}

    def nbytes(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    fp8_bytes = bf16_bytes_of_fp8 = other_bytes = 0
    for name, parameter in bf16.named_parameters():
        if name in kept_fp8:
            *matrices, rows, cols = parameter.shape
            blocks = math.prod(matrices) * math.ceil(rows / BLOCK) * math.ceil(cols / BLOCK)
            fp8_bytes += parameter.numel() + 4 * blocks
            bf16_bytes_of_fp8 += parameter.numel() * 2
        else:
            other_bytes += parameter.numel() * parameter.element_size()
    assert nbytes(bf16) == bf16_bytes_of_fp8 + other_bytes
    assert nbytes(kept) == fp8_bytes + other_bytes
    # The quantized weights take half their bf16 bytes, the scales adding well under 1% at these (partial) blocks.
    assert 0.5 < fp8_bytes / bf16_bytes_of_fp8 < 0.505
    # Whole model: 0.525 here, where the bf16 embedding, head and router weigh more than in V3 (0.502 from its shapes).
    assert 0.5 < nbytes(kept) / nbytes(bf16) < 0.53


def test_kept_fp8_runs_exactly_like_the_dequantized_model_on_cpu(checkpoint, torch_path):
    """Where the kernels do not run, each weight is dequantized in fp32 and cast, as loading dequantized does: the
    logits are bit-identical (same eager experts), and in fp32 they match the independent reference."""
    folder, reference = checkpoint
    kept, dequantized = load(folder, False), load(folder, True, experts_implementation="eager")
    assert isinstance(kept.model.layers[0].self_attn.kv_b_proj, DeepseekFp8Linear)
    with torch.no_grad():
        assert torch.equal(kept(INPUT_IDS).logits, dequantized(INPUT_IDS).logits)
        prompt = INPUT_IDS[:1]
        # Decoding takes the absorbed MLA path, which reads kv_b_proj's (dequantized) weight directly.
        expected = dequantized.generate(prompt, max_new_tokens=5, do_sample=False)
        assert torch.equal(kept.generate(prompt, max_new_tokens=5, do_sample=False), expected)
        assert torch.equal(kept.generate(prompt, max_new_tokens=5, do_sample=False, use_mtp=True), expected)
        kept_fp32 = load(folder, False, dtype=torch.float32)
        assert_close(kept_fp32(INPUT_IDS).logits, reference(INPUT_IDS).logits, 1e-5, "fp32 kept vs reference")


def test_kept_fp8_runs_with_layers_offloaded_to_disk(checkpoint, torch_path, tmp_path):
    """accelerate's offload hooks carry E4M3 weights and scales too; absorbed decoding reads the offloaded kv_b_proj
    through its hook (`loaded_weights`)."""
    folder, _ = checkpoint
    on_disk = {f"model.layers.{i}": "disk" for i in (1, 2)}
    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.layers.0", "model.layers.3", "model.norm")}
    device_map.update(on_disk, **{"model.rotary_emb": "cpu", "lm_head": "cpu"})
    offloaded = load(folder, False, device_map=device_map, offload_folder=tmp_path)
    assert offloaded.model.layers[1].self_attn.kv_b_proj.weight.device.type == "meta"
    kept = load(folder, False)
    with torch.no_grad():
        assert torch.equal(offloaded(INPUT_IDS).logits, kept(INPUT_IDS).logits)
        prompt = INPUT_IDS[:1]
        expected = kept.generate(prompt, max_new_tokens=3, do_sample=False)
        assert torch.equal(offloaded.generate(prompt, max_new_tokens=3, do_sample=False), expected)


def test_by_default_fp8_is_kept_only_on_gpus_running_the_kernels(checkpoint):
    folder, _ = checkpoint
    model = load(folder, dequantize=None)
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert not keeps_fp8_on(None) and not keeps_fp8_on("cpu") and not keeps_fp8_on({"model": 0, "lm_head": "cpu"})
    assert keeps_fp8_on("cuda") == (torch.cuda.is_available() and fp8_kernels.fp8_gemm_runs_on("cuda"))
    if keeps_fp8_on("cuda"):  # a GPU where the kernels run: kept by default
        assert load(folder, dequantize=None, device_map="cuda").model.layers[1].mlp.experts.down_proj.dtype == E4M3


def test_experts_of_partial_blocks_are_dequantized_while_linears_stay_fp8(tmp_path, torch_path):
    """moe_intermediate_size 32: a fused gate_up scale grid would not be the per-expert grids side by side."""
    folder, reference = write_fp8_checkpoint(tmp_path)
    kept, dequantized = load(folder, False), load(folder, True, experts_implementation="eager")
    experts = kept.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16 and not hasattr(experts, "gate_up_proj_scale_inv")
    assert torch.equal(experts.gate_up_proj, dequantized.model.layers[1].mlp.experts.gate_up_proj)
    assert kept.model.layers[1].self_attn.o_proj.weight.dtype == E4M3
    assert kept.config._experts_implementation != "deepseek_fp8"
    with torch.no_grad():
        kept.set_experts_implementation("eager")
        assert torch.equal(kept(INPUT_IDS).logits, dequantized(INPUT_IDS).logits)


def test_kept_fp8_is_inference_only(checkpoint, torch_path, tmp_path):
    folder, _ = checkpoint
    model = load(folder, dequantize=False)
    model.train()
    with pytest.raises(RuntimeError, match="inference only.*dequantize=True"):
        model(INPUT_IDS, labels=INPUT_IDS)
    model.eval()
    logits = model(INPUT_IDS).logits  # eval forward with autograd on: gradients reach the inputs' producers
    logits.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert not model.hf_quantizer.is_trainable
    with pytest.raises(ValueError, match="fine-tuning on purely quantized models"):
        Trainer(model=model, args=TrainingArguments(output_dir=tmp_path, use_cpu=True, report_to=[]))
    with pytest.raises(ValueError, match="keeps its experts in FP8"):
        model.set_experts_implementation("grouped_mm")
    with pytest.raises(ValueError, match="dequantize must be True, False or None"):
        DeepseekFp8Config(dequantize="no")


def test_dequantize_turns_a_kept_model_into_the_dequantized_one(checkpoint, torch_path):
    """transformers' `model.dequantize()`: plain weights equal to loading dequantized, which then train."""
    folder, _ = checkpoint
    model = load(folder, dequantize=False).dequantize()
    expected = load(folder, dequantize=True)
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    assert type(model.model.layers[0].self_attn.kv_b_proj) is torch.nn.Linear
    assert model.config._experts_implementation == expected.config._experts_implementation
    state = model.state_dict()
    assert state.keys() == expected.state_dict().keys()
    assert all(torch.equal(state[k], t) and state[k].dtype == t.dtype for k, t in expected.state_dict().items())
    model.train()
    model(INPUT_IDS, labels=INPUT_IDS).loss.backward()
    assert model.model.layers[1].mlp.experts.gate_up_proj.grad is not None
    assert model.model.layers[0].self_attn.kv_b_proj.weight.grad is not None


@pytest.mark.parametrize(
    "official_format, scale_fmt", [(False, None), (True, None), (True, "ue8m0")], ids=["ours", "official", "ue8m0"]
)
def test_save_writes_the_official_fp8_layout_and_reloads_bit_exact(
    request, tmp_path, torch_path, official_format, scale_fmt
):
    """The saved folder holds the files' tensors and DeepSeek's `quantization_config` (`scale_fmt` included)."""
    folder, _ = request.getfixturevalue("checkpoint" if scale_fmt is None else "ue8m0_checkpoint")
    kept = load(folder, dequantize=False)
    kept.save_pretrained(tmp_path, official_format=official_format)

    files, saved = read_files(folder), read_files(tmp_path)
    assert saved.keys() == files.keys()  # per-expert weights, every scale, the MTP layer's own copies
    for name, tensor in files.items():
        assert saved[name].shape == tensor.shape, name
        if tensor.dtype == E4M3 or name.endswith("_scale_inv"):
            assert saved[name].dtype == tensor.dtype and torch.equal(bits(saved[name]), bits(tensor)), name
        else:  # held, and so saved, in the load dtype (the router in fp32 by design)
            dtype = torch.float32 if name.endswith(FP32_BY_DESIGN) else torch.bfloat16
            assert saved[name].dtype == dtype and torch.equal(saved[name], tensor.to(dtype)), name
    config = json.loads((tmp_path / "config.json").read_text())
    official = QUANTIZATION_CONFIG if scale_fmt is None else {**QUANTIZATION_CONFIG, "scale_fmt": scale_fmt}
    assert config["quantization_config"] == official  # DeepSeek's form
    assert config["model_type"] == ("deepseek_v3" if official_format else "deepseek_moe")

    again = load(tmp_path, dequantize=False)
    assert again.config.quantization_config.scale_fmt == scale_fmt
    again = again.state_dict()
    assert again.keys() == kept.state_dict().keys()
    assert all(torch.equal(bits(again[k]), bits(t)) and again[k].dtype == t.dtype for k, t in kept.state_dict().items())
    expected = load(folder, dequantize=True).state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in load(tmp_path, dequantize=True).state_dict().items())


# ------------------------------------------------------------ Triton FP8 kernels (on a GPU, else the interpreter)

KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(
    not fp8_kernels.fp8_gemm_runs_on(KERNEL_DEVICE), reason="FP8 Triton kernels: no FP8 GPU and no TRITON_INTERPRET=1"
)
# Against the E4M3 emulation only summation differs: fp32 under the interpreter; on GPUs FP8 tensor cores accumulate
# each 128-long chunk with ~14 bits before the fp32 promotion (DeepSeek-V3 report §3.3.2), hence the looser bound.
KERNEL_TOLERANCE = 1e-3 if KERNEL_DEVICE.type == "cuda" else 1e-5


def e4m3_activations(x: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """x rounded through E4M3 as DeepSeek's act_quant does it, per 1×128 tile of the last dimension (partial last tile):
    s = max(amax, 1e-4) / 448, with `ue8m0` 2^ceil(log2 s) (log2 in float64, exact for an fp32 s), x ≈ e4m3(x / s) · s.
    The emulation the kernels are compared with."""
    width = x.shape[-1]
    tiles = torch.nn.functional.pad(x.float(), (0, -width % BLOCK)).unflatten(-1, (-1, BLOCK))
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale.double()))).float()
    return ((tiles / scale).to(E4M3).float() * scale).flatten(-2)[..., :width].to(x.dtype)


def emulate_fp8_activations(model, files: dict[str, torch.Tensor], ue8m0: bool) -> None:
    """Make an unquantized model compute as kept FP8 does: every linear stored in FP8 gets its input rounded through
    E4M3 per 1×128 tile, and routed experts run `emulated_experts`."""
    fp8_names = [name.removesuffix(".weight_scale_inv") for name in files if name.endswith(".weight_scale_inv")]
    for name in fp8_names:
        if not EXPERT_WEIGHT.fullmatch(name + ".weight"):
            model.get_submodule(name).register_forward_pre_hook(lambda m, args: (e4m3_activations(args[0], ue8m0),))
    for prefix in (f"model.layers.{i}.mlp.experts" for i in range(model.config.num_hidden_layers)):
        if prefix + ".0.down_proj.weight" in files:
            experts = model.get_submodule(prefix)
            experts.forward = functools.partial(emulated_experts, files, prefix, ue8m0)


def emulated_experts(files, prefix: str, ue8m0: bool, hidden, top_k_index, top_k_weights) -> torch.Tensor:
    """The routed experts `prefix` token by token on the files' weights (dequantized by checkpoint_utils' own
    expansion), the expert input and the SwiGLU output rounded through E4M3 per 1×128 tile."""

    def weight(expert: int, projection: str) -> torch.Tensor:
        name = f"{prefix}.{expert}.{projection}_proj.weight"
        return dequantize(files[name], files[name + "_scale_inv"])

    out = torch.zeros_like(hidden)
    for token, (experts_of_token, weights) in enumerate(zip(top_k_index.tolist(), top_k_weights, strict=True)):
        x = e4m3_activations(hidden[token], ue8m0)
        for expert, routing_weight in zip(experts_of_token, weights, strict=True):
            h = torch.nn.functional.silu(weight(expert, "gate") @ x) * (weight(expert, "up") @ x)
            out[token] += routing_weight * (weight(expert, "down") @ e4m3_activations(h, ue8m0))
    return out


@needs_kernels
def test_triton_fp8_linears_match_the_model_with_e4m3_activations(checkpoint, monkeypatch):
    """With every FP8 linear on the Triton GEMM, the fp32 logits equal those of the same weights with each linear's
    input rounded through E4M3 (emulated, PyTorch path) up to fp32 summation order; the unquantized model differs by
    far more, so the kernels did run. Experts stay on the eager path here (their kernel: the next test)."""
    folder, reference = checkpoint
    kernels = load(folder, False, dtype=torch.float32, experts_implementation="eager").to(KERNEL_DEVICE)
    emulated = load(folder, False, dtype=torch.float32, experts_implementation="eager")
    for module in emulated.modules():
        if isinstance(module, DeepseekFp8Linear):
            module.register_forward_pre_hook(lambda module, args: (e4m3_activations(args[0]),))
    with torch.no_grad():
        fast = kernels(INPUT_IDS.to(KERNEL_DEVICE)).logits.cpu()
        monkeypatch.setattr(fp8_kernels, "fp8_gemm_runs_on", lambda device: False)
        slow, plain = emulated(INPUT_IDS).logits, reference(INPUT_IDS).logits
    scale = plain.abs().max()
    error, drift = (fast - slow).abs().max() / scale, (fast - plain).abs().max() / scale
    # Measured (interpreter): 6e-7 against the emulation, 0.2 against unquantized activations (routing flips too).
    assert error <= KERNEL_TOLERANCE and drift > 1e-2


@needs_kernels
def test_triton_fp8_experts_match_e4m3_activations_on_the_files_weights(checkpoint):
    """One MoE layer's kept experts through the fused FP8 kernel against a token-by-token loop on the files' weights
    (dequantized by checkpoint_utils' own expansion), x and the SwiGLU output rounded through E4M3 per 1×128 tile."""
    folder, _ = checkpoint
    model = load(folder, dequantize=False, dtype=torch.float32).to(KERNEL_DEVICE)
    experts = model.model.layers[1].mlp.experts
    files = read_files(folder)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, model.config.hidden_size, generator=generator)
    top_k_index = torch.stack([torch.randperm(experts.num_experts, generator=generator)[:4] for _ in range(7)])
    top_k_weights = torch.rand(7, 4, generator=generator)
    with torch.no_grad():
        fast = experts(*(t.to(KERNEL_DEVICE) for t in (hidden, top_k_index, top_k_weights))).cpu()
    expected = emulated_experts(files, "model.layers.1.mlp.experts", False, hidden, top_k_index, top_k_weights)
    assert_close(fast, expected, KERNEL_TOLERANCE, "fused FP8 experts vs E4M3 emulation")  # interpreter: 3e-7


@needs_kernels
def test_kept_fp8_generates_with_the_triton_kernels(checkpoint):
    folder, _ = checkpoint
    model = load(folder, dequantize=False).to(KERNEL_DEVICE)
    assert model.config._experts_implementation == "deepseek_fp8"
    with torch.no_grad():
        prompt = INPUT_IDS[:1, :3].to(KERNEL_DEVICE)
        assert model.generate(prompt, max_new_tokens=2, do_sample=False).shape == (1, 5)


# ------------------------------------------------------ kept FP8 through the remote code, without this package

KEPT_REMOTE_CODE_CHILD = (
    HIDE_PACKAGE
    + """
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

folder, how, prompts, out = sys.argv[1:]
if how == "class":  # the config class as the folder's code defines it
    config_class = get_class_from_dynamic_module("quantization_deepseek_moe.DeepseekFp8Config", folder)
else:  # the class of the checkpoint's own quantization_config
    config_class = type(AutoConfig.from_pretrained(folder, trust_remote_code=True).quantization_config)
model = AutoModelForCausalLM.from_pretrained(
    folder, trust_remote_code=True, dtype=torch.float32, quantization_config=config_class(dequantize=False)
).eval()
modeling = sys.modules[type(model).__module__]
prompts = torch.tensor(eval(prompts))
with torch.no_grad():
    logits = model(prompts).logits
    tokens = model.generate(prompts[:1], max_new_tokens=3, do_sample=False)
result = {
    "module": type(model).__module__,
    "experts": model.config._experts_implementation,
    "e4m3": sorted(n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn),
    # Whether the FP8 linears are of the model code's own class (True) or another copy's (False).
    "linears": sorted({type(m) is modeling.DeepseekFp8Linear for m in model.modules() if "Fp8" in type(m).__name__}),
    "logits": logits,
    "tokens": tokens,
}
torch.save(result, out)
"""
)


@pytest.fixture(scope="module")
def saved_kept(checkpoint, tmp_path_factory):
    """A kept model saved by `save_pretrained` (our layout, its remote code beside it), with its fp32 logits on
    INPUT_IDS and 3 greedy tokens after INPUT_IDS[:1] (absorbed decoding)."""
    folder, _ = checkpoint
    kept = load(folder, dequantize=False, dtype=torch.float32)
    saved = tmp_path_factory.mktemp("kept-remote") / "saved"
    kept.save_pretrained(saved)
    e4m3 = sorted(n for n, p in kept.named_parameters() if p.dtype == E4M3)
    with torch.no_grad():
        return saved, e4m3, kept(INPUT_IDS).logits, kept.generate(INPUT_IDS[:1], max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("how", ["class", "checkpoint config"])
def test_kept_fp8_loads_as_remote_code_without_the_package(saved_kept, tmp_path, how):
    """A saved kept model loads kept through its remote code where `deepseek_moe` cannot be imported, the
    `DeepseekFp8Config` taken from the folder's code or from its config (which first imports another copy of the
    quantizer: remote code from a local folder comes in one copy per entry module): E4M3 weights, FP8 linears of the
    model code's own class, FP8 experts, and the package's logits and greedy tokens (same code, same kernels: bit for
    bit here; 1e-6 leaves room for a BLAS that splits sums by thread count, the child running one thread)."""
    saved, e4m3, logits, tokens = saved_kept
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    out = tmp_path / "result.pt"
    arguments = [str(saved), how, repr(INPUT_IDS.tolist()), str(out)]
    child = subprocess.run(
        [sys.executable, "-I", "-c", KEPT_REMOTE_CODE_CHILD, *arguments], capture_output=True, text=True, env=env
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = torch.load(out)
    assert result["module"].startswith("transformers_modules") and result["e4m3"] == e4m3
    assert result["experts"] == "deepseek_fp8" and result["linears"] == [True]
    assert_close(result["logits"], logits, 1e-6, "remote code vs package")
    assert torch.equal(result["tokens"], tokens)


# ------------------------------------------------------ ue8m0 checkpoints (DeepSeek-V3.1: power-of-two scales)


@pytest.fixture(scope="module")
def ue8m0_checkpoint(tmp_path_factory):
    """`"scale_fmt": "ue8m0"`, power-of-two weight scales, experts of whole 128-row blocks (kept FP8 too)."""
    return write_fp8_checkpoint(tmp_path_factory.mktemp("kept-ue8m0"), scale_fmt="ue8m0", moe_intermediate_size=BLOCK)


@needs_kernels
def test_kept_ue8m0_checkpoint_runs_with_power_of_two_activation_scales(ue8m0_checkpoint):
    """Kept FP8 with every linear and the experts on the Triton kernels: the fp32 logits equal those of the reference
    (naively dequantized) weights with each FP8 GEMM's input rounded through E4M3 per 1×128 tile with power-of-two
    scales (test-written emulation). Only fp32 summation order differs, which now and then moves an activation across
    an E4M3 rounding midpoint downstream: KERNEL_TOLERANCE, as for plain scales (interpreter: measured 2.6e-7). The
    same emulation with amax/448 scales is off by 0.23 of the largest logit, so the checkpoint's `scale_fmt` reached
    every kernel."""
    folder, _ = ue8m0_checkpoint
    files = read_files(folder)
    kept = load(folder, False, dtype=torch.float32).to(KERNEL_DEVICE)
    assert kept.config.quantization_config.scale_fmt == "ue8m0"
    assert kept.config._experts_implementation == "deepseek_fp8"
    with torch.no_grad():
        fast = kept(INPUT_IDS.to(KERNEL_DEVICE)).logits.cpu()
        emulated = {}
        for ue8m0 in (True, False):
            model = DeepseekMoeForCausalLM.from_pretrained(folder.parent / "reference", dtype=torch.float32).eval()
            emulate_fp8_activations(model, files, ue8m0)
            emulated[ue8m0] = model(INPUT_IDS).logits
    assert_close(fast, emulated[True], KERNEL_TOLERANCE, "kept ue8m0 vs power-of-two emulation")
    assert (fast - emulated[False]).abs().max() > 1e-2 * emulated[True].abs().max()
