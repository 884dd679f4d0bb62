"""Two CPU processes (gloo, one thread each) train a tiny V3 model with MTP and the V3 bias update under every
parallel layout (DDP, FSDP2, TP, EP (over a TP group), FSDP2 + EP from memory and from a saved folder, by hand
and through Accelerate; gradients synchronised once per optimizer step or at every micro-batch; gradients
clipped) and must match one process over the same global batches: losses to 1e-5, the same
`e_score_correction_bias` exactly, the same weights. One `torchrun` job runs every layout
(`distributed_worker.py`); the layout validation runs in process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import ACCELERATE_LAYOUTS, LAYOUTS, build_model, run_single_process

from deepseek_moe import DeepseekMoeConfig
from deepseek_moe.training import moe_routers
from deepseek_moe.training.parallel import distributed_config

WORKER = Path(__file__).with_name("distributed_worker.py")
ALL_LAYOUTS = list(LAYOUTS) + list(ACCELERATE_LAYOUTS)


@pytest.fixture(scope="module")
def reference() -> dict:
    torch.set_num_threads(1)
    result = run_single_process()
    start = {name: router.e_score_correction_bias for name, router in moe_routers(build_model()).items()}
    for name, bias in result["bias"].items():  # the runs compare a bias that moved, in every router
        assert not torch.equal(bias, start[name]), name
    return result


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("distributed") / "results.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [*command, str(WORKER), str(output), *ALL_LAYOUTS], env=env, capture_output=True, text=True, timeout=400
    )
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return torch.load(output)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_two_processes_match_one(layout: str, distributed: dict, reference: dict) -> None:
    result = distributed[layout]
    assert len(result["losses"]) == len(reference["losses"])
    for got, expected in zip(result["losses"], reference["losses"], strict=True):
        assert got == pytest.approx(expected, rel=1e-5)
    for name, bias in reference["bias"].items():
        assert torch.equal(result["bias"][name], bias), name
    for name, value in reference["params"].items():
        torch.testing.assert_close(result["params"][name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("world", "flags", "message"),
    [
        (2, {"ep_size": 3, "fsdp": True}, "ep_size=3 does not divide the 16 routed experts"),
        (6, {"ep_size": 4, "fsdp": True}, "ep_size=4 does not divide the world size 6"),
        (4, {"ep_size": 4, "tp_size": 2}, "ep_size=4 needs fsdp"),
        (4, {"tp_size": 2}, "tp_size=2 .* must be the world size 4"),
        (4, {"ep_size": 2}, "tp_size=2 .* must be the world size 4"),
        (3, {"tp_size": 2, "fsdp": True}, "tp_size=2 does not divide the world size 3"),
        (4, {"ep_size": 2, "tp_size": 4, "fsdp": True}, "ep_size=2 must be a multiple of tp_size=4"),
        (2, {"ep_size": 0}, "ep_size must be a positive integer"),
        (2, {"fsdp": True, "ep_implementation": "carrier_pigeon"}, "ep_implementation must be one of"),
    ],
)
def test_bad_layouts_raise(monkeypatch, world: int, flags: dict, message: str) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ValueError, match=message):
        distributed_config(DeepseekMoeConfig.from_preset("tiny-v3"), **flags)


def test_plain_data_parallel_needs_no_engine(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed_config(DeepseekMoeConfig.from_preset("tiny-v3")) is None
    config = distributed_config(DeepseekMoeConfig.from_preset("tiny-v3"), fsdp=True, ep_size=2)
    assert (config.fsdp_size, config.ep_size, config.tp_size, config.ep_implementation) == (2, 2, 1, "all_to_all")
    config = distributed_config(DeepseekMoeConfig.from_preset("tiny-v3"), ep_size=2)  # EP alone: over a TP group
    assert (config.fsdp_size, config.ep_size, config.tp_size) == (1, 2, 2)


def test_eager_experts_skip_pairs_of_other_ranks() -> None:
    """transformers' all-reduce expert parallelism hands each rank every pair, those of other ranks' experts as id
    `num_experts` with weight 0: the eager experts skip them (and a rank with none of its own returns zeros)."""
    from conftest import randomize_

    from deepseek_moe.model.modeling_deepseek_moe import DeepseekMoeExperts

    config = DeepseekMoeConfig.from_preset("tiny-v3")
    config._experts_implementation = "eager"
    experts = randomize_(DeepseekMoeExperts(config))
    hidden = torch.randn(6, config.hidden_size, generator=torch.Generator().manual_seed(0))
    index = torch.randint(0, 16, (6, 4), generator=torch.Generator().manual_seed(1))
    weights = torch.rand(6, 4, generator=torch.Generator().manual_seed(2))
    off_rank = index >= 8
    experts.num_experts = 8  # this rank's half, as the engine's sharding sets it
    with torch.no_grad():
        experts.gate_up_proj.data, experts.down_proj.data = experts.gate_up_proj[:8], experts.down_proj[:8]
    got = experts(hidden, index.masked_fill(off_rank, 8), weights.masked_fill(off_rank, 0.0))
    expected = experts(hidden, index.masked_fill(off_rank, 0), weights.masked_fill(off_rank, 0.0))
    torch.testing.assert_close(got, expected)
    none_here = experts(hidden, torch.full_like(index, 8), torch.zeros_like(weights))
    assert torch.equal(none_here, torch.zeros_like(hidden))


def test_single_process_layout_is_the_model_itself(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from deepseek_moe.training.parallel import DataParallelLayout, data_parallel_layout, prepare_model_for_parallelism

    model = build_model()
    assert prepare_model_for_parallelism(model, fsdp=True) is model
    assert data_parallel_layout(model) == DataParallelLayout(size=1, rank=0)
