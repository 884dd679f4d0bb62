"""Triton fused experts against a PyTorch reference: outputs and all four gradients, routing metadata, kernel
selection, the model's logits and PEFT LoRA on the 3D expert weights. Without a GPU, conftest puts triton in its CPU
interpreter (`TRITON_INTERPRET=1`), so shapes are kept tiny."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, tiny_model

pytest.importorskip("triton")

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM  # noqa: E402
from deepseek_moe.model import moe_kernels, triton_support  # noqa: E402

# fp64 reference; tolerance relative to the output's largest entry. bf16 allows a few ulps (2⁻⁸ each): the kernels
# round h and the per-slot outputs once, the interpreter stores bf16 by truncation. On a GPU, fp32 `tl.dot` runs
# in TF32 (triton's default; 10-bit mantissa).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-3 if DEVICE == "cuda" else 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
MODEL_TOLERANCE = {"rtol": 2e-2, "atol": 2e-3} if DEVICE == "cuda" else {"rtol": 1e-4, "atol": 1e-5}


def _reference(x, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """Σ_j w_j · down[e_j](silu(gate[e_j] x) · up[e_j] x), one slot at a time through gathered weights."""
    gate, up = torch.einsum("th,tkoh->tko", x, gate_up_proj[top_k_index]).chunk(2, dim=-1)
    per_slot = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, down_proj[top_k_index])
    return (per_slot * top_k_weights[..., None]).sum(1)


def _routing(num_tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token with skewed popularity; the last expert never gets a token."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_tokens, num_experts, generator=generator) + torch.linspace(2, 0, num_experts)
    scores[:, -1] = -float("inf")
    weights, index = scores.softmax(-1).topk(top_k)
    return index, weights


def _inputs(num_tokens, hidden, inter, num_experts, top_k, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=generator, dtype=torch.float64) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, generator=generator, dtype=torch.float64) / inter**0.5
    index, weights = _routing(num_tokens, num_experts, top_k, seed)
    return [t.to(dtype) for t in (x, weights.double(), gate_up, down)], index


# (tokens, hidden, intermediate, experts, top-k, BLOCK_M): non-multiples of the 32-wide tiles, top-1, single-token
# decode, uneven groups (skewed routing, one empty expert), a group larger than one tile.
SHAPES = [
    pytest.param(13, 48, 40, 5, 3, None, id="uneven"),
    pytest.param(1, 32, 32, 4, 1, None, id="decode-top1"),
    pytest.param(24, 64, 32, 4, 1, 16, id="top1-multi-tile"),
    pytest.param(37, 32, 48, 6, 2, 64, id="block64"),
    pytest.param(150, 96, 80, 12, 6, 64, id="larger", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_tokens", "hidden", "inter", "num_experts", "top_k", "block_m"), SHAPES)
def test_fused_experts_match_reference(num_tokens, hidden, inter, num_experts, top_k, block_m, dtype):
    (x, weights, gate_up, down), index = _inputs(num_tokens, hidden, inter, num_experts, top_k, dtype)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, weights, gate_up, down)]
    out = moe_kernels.fused_experts(leaves[0], index.to(DEVICE), leaves[1], *leaves[2:], block_m=block_m)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_out.to(dtype).to(DEVICE))

    reference_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    reference = _reference(reference_leaves[0], index, *reference_leaves[1:])
    reference.backward(grad_out.to(dtype).double())
    assert_close(out, reference.detach(), TOLERANCE[dtype], "output")
    for name, leaf, reference_leaf in zip(
        ("x", "routing weights", "gate_up_proj", "down_proj"), leaves, reference_leaves, strict=True
    ):
        assert_close(leaf.grad, reference_leaf.grad, TOLERANCE[dtype], f"grad {name}")


def test_inference_path_matches_training_path():
    """Without autograd nothing is saved (decode); the result is the same as the differentiable path's (bit for bit
    in the interpreter; on a GPU the two may be autotuned to different tiles)."""
    tensors, index = _inputs(9, 32, 32, 4, 2, torch.float32)
    (x, weights, gate_up, down), index = [t.to(DEVICE) for t in tensors], index.to(DEVICE)
    with torch.no_grad():
        inference = moe_kernels.fused_experts(x, index, weights, gate_up, down)
    training = moe_kernels.fused_experts(x.requires_grad_(), index, weights, gate_up, down)
    tolerance = 1e-6 if DEVICE == "cuda" else 0.0
    torch.testing.assert_close(inference, training.detach(), rtol=tolerance, atol=tolerance)


def test_deterministic_and_without_host_synchronisation():
    """No atomics: two runs agree bit for bit. On a GPU, the whole step (after autotuning) must not sync the host;
    on CPU, at least the metadata code must not ask for host values."""
    (x, weights, gate_up, down), index = _inputs(21, 32, 32, 5, 3, torch.float32)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, weights, gate_up, down)]
    index = index.to(DEVICE)

    def step() -> list[torch.Tensor]:
        out = moe_kernels.fused_experts(leaves[0], index, *leaves[1:])
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return [out, *grads]

    first = step()
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        second = step()
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    source = inspect.getsource(moe_kernels.routing_metadata)
    assert not any(call in source for call in (".item(", ".tolist(", ".cpu(", "bincount(", "nonzero(", "unique("))


def test_mixed_dtypes_and_empty_batch():
    """fp32 activations with bf16 weights (autocast) run in the weights' dtype; zero tokens give an empty output."""
    tensors, index = _inputs(5, 32, 32, 4, 2, torch.float32)
    (x, weights, gate_up, down), index = [t.to(DEVICE) for t in tensors], index.to(DEVICE)
    out = moe_kernels.fused_experts(x, index, weights, gate_up.bfloat16(), down.bfloat16())
    assert out.dtype == torch.float32
    assert moe_kernels.fused_experts(x[:0], index[:0], weights[:0], gate_up, down).shape == (0, 32)
    x, weights, gate_up, down = (t.cpu().double() for t in (x, weights, gate_up.bfloat16(), down.bfloat16()))
    assert_close(out, _reference(x, index.cpu(), weights, gate_up, down), TOLERANCE[torch.bfloat16], "output")


def test_routing_metadata_tiles_cover_each_expert_group():
    num_experts, block_m = 6, 16
    index, _ = _routing(29, num_experts, 3, seed=2)
    meta = moe_kernels.routing_metadata(index, num_experts, block_m)
    flat = index.reshape(-1)
    torch.testing.assert_close(meta.tokens_per_expert, torch.bincount(flat, minlength=num_experts))
    assert meta.tokens_per_expert[-1] == 0
    assert torch.equal(flat[meta.sorted_slots.long()], flat.sort(stable=True).values)
    covered = torch.zeros(flat.numel(), dtype=torch.long)
    for expert, start in zip(meta.tile_expert.tolist(), meta.tile_row_start.tolist(), strict=True):
        if expert == num_experts:
            continue
        end = min(start + block_m, int(meta.expert_offsets[expert + 1]))
        assert meta.expert_offsets[expert] <= start < end
        covered[start:end] += 1
    assert torch.equal(covered, torch.ones_like(covered))


def _dot_kernels() -> list[ast.FunctionDef]:
    tree = ast.parse(inspect.getsource(moe_kernels))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and any(isinstance(n, ast.Attribute) and n.attr == "dot" for n in ast.walk(node))
    ]


def test_every_dot_dimension_is_a_constexpr_of_at_least_16(monkeypatch):
    """The interpreter accepts tiny `tl.dot` shapes that the GPU compiler rejects; check the tiles statically.

    Every kernel with a `tl.dot` takes its tile sizes as BLOCK_M/N/K constexprs, builds its accumulators from them
    only, and every value those constexprs get (the GPU autotune configs and the host's BLOCK_M) is a power of
    two ≥ 16."""
    kernels = _dot_kernels()
    # `_rows_times_weight` holds the GEMM loop of the scatter and SwiGLU-backward kernels.
    assert {k.name for k in kernels} >= {"_gate_up_swiglu_kernel", "_rows_times_weight", "_grouped_wgrad_kernel"}
    for kernel in kernels:
        constexprs = {
            a.arg for a in kernel.args.args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)
        }
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= constexprs, kernel.name
        for call in ast.walk(kernel):
            if isinstance(call, ast.Call) and ast.unparse(call.func) == "tl.zeros":
                names = {n.id for n in ast.walk(call.args[0]) if isinstance(n, ast.Name)}
                assert names <= {"BLOCK_M", "BLOCK_N", "BLOCK_K"}, (kernel.name, ast.unparse(call))
    monkeypatch.setattr(moe_kernels, "INTERPRET", False)
    sizes = [moe_kernels.BLOCK_M_TRAIN, moe_kernels.BLOCK_M_DECODE]
    for config in moe_kernels._gemm_configs():
        sizes += [config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]]
    assert all(size >= 16 and size & (size - 1) == 0 for size in sizes), sizes


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(["--quick", "90", "bf16"], id="sm90-bf16-first-config"),
        pytest.param(["90", "bf16", "90", "fp16", "80", "fp32"], id="all-configs", marks=pytest.mark.slow),
    ],
)
def test_kernels_compile_for_gpus(arguments, tmp_path):
    """Triton's GPU pipeline (down to a cubin, through its bundled ptxas) accepts every kernel variant, both BLOCK_M
    and the autotune configs; no GPU needed. Runs outside the interpreter, in a subprocess."""
    script = Path(__file__).with_name("kernels_aot_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(Path(moe_kernels.__file__).resolve().parents[2]), TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, str(script), *arguments], env=env, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()[-3000:]


def _tiny_model(**overrides) -> DeepseekMoeForCausalLM:
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=0, num_hidden_layers=2, **overrides)
    return tiny_model(config).eval()


def test_default_stays_pytorch_without_cuda_and_is_triton_with_it(monkeypatch):
    model = _tiny_model()
    if not torch.cuda.is_available():
        assert model.config._experts_implementation != moe_kernels.IMPLEMENTATION_NAME
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model.get_correct_experts_implementation(None) == moe_kernels.IMPLEMENTATION_NAME
    assert model.get_correct_experts_implementation("grouped_mm") == "grouped_mm"


def test_model_logits_and_gradients_match_eager():
    model = _tiny_model().to(DEVICE)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(DEVICE)
    results = {}
    for implementation in ("eager", moe_kernels.IMPLEMENTATION_NAME):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        logits = model(input_ids).logits
        logits.square().mean().backward()
        moe = model.model.layers[1].mlp  # the router's gradient comes through the routing-weight gradient
        grads = (moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad, moe.gate.weight.grad)
        results[implementation] = (logits.detach(), *(grad.clone() for grad in grads))
    for ours, eager in zip(results[moe_kernels.IMPLEMENTATION_NAME], results["eager"], strict=True):
        torch.testing.assert_close(ours, eager, **MODEL_TOLERANCE)


def test_falls_back_to_pytorch_where_kernels_cannot_run(monkeypatch):
    """On CPU tensors outside the interpreter `deepseek_triton` is exactly the module's PyTorch forward."""
    model = _tiny_model()
    input_ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        eager = model(input_ids).logits
        monkeypatch.setattr(triton_support, "INTERPRET", False)
        model.set_experts_implementation(moe_kernels.IMPLEMENTATION_NAME)
        torch.testing.assert_close(model(input_ids).logits, eager, rtol=0, atol=0)


def test_peft_lora_on_expert_weights_reaches_the_kernels(tmp_path):
    """PEFT parametrizes the 3D weights; the kernels must read the adapted ones and pass gradients to LoRA."""
    peft = pytest.importorskip("peft")
    model = _tiny_model()
    model.save_pretrained(tmp_path)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(DEVICE)
    results = {}
    for implementation in ("eager", moe_kernels.IMPLEMENTATION_NAME):
        base = DeepseekMoeForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation)
        base = base.to(DEVICE).eval()
        assert base.config._experts_implementation == implementation
        config = peft.LoraConfig(
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], r=4, init_lora_weights=False
        )
        torch.manual_seed(0)
        lora = peft.get_peft_model(base, config)
        logits = lora(input_ids).logits
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
        assert grads and all(g.abs().sum() > 0 for g in grads.values())
        with lora.disable_adapter():
            base_logits = lora(input_ids).logits.detach()
        assert (logits - base_logits).abs().max() > 1e-3  # the adapter changes the output
        results[implementation] = (logits.detach(), grads)
    torch.testing.assert_close(results[moe_kernels.IMPLEMENTATION_NAME][0], results["eager"][0], **MODEL_TOLERANCE)
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results[moe_kernels.IMPLEMENTATION_NAME][1][name], grad, **MODEL_TOLERANCE)


def test_importable_without_triton_and_as_remote_code():
    """Hub remote code: triton is imported only inside `try:` (transformers' `check_imports` skips those), and
    without it the modules import, the kernels do not become the default and the PyTorch forward runs."""
    from transformers.dynamic_module_utils import get_imports

    for module in (moe_kernels, triton_support):
        assert "triton" not in get_imports(module.__file__), module.__name__
    repo_root = str(Path(moe_kernels.__file__).resolve().parents[2])
    script = Path(__file__).with_name("child_import_without_triton.py")
    result = subprocess.run(
        [sys.executable, str(script)], env={**os.environ, "PYTHONPATH": repo_root}, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
