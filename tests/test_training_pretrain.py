"""`deepseek-moe train`: exact resume from a checkpoint, partial checkpoints ignored, bad input rejected before any
step, and two processes training like one on the same global batch."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.cli import main
from deepseek_moe.training.pretrain import TrainArguments, load_train_arguments, lr_lambda, train

WORDS = "the cat sat on a mat while dogs ran far away from big red trees and small blue rocks".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A small text file of blank-line separated documents of varied length."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    documents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(80)]
    path.write_text("\n\n".join(documents) + "\n")
    return str(path)


def _args(corpus: str, output_dir: Path, **overrides) -> TrainArguments:
    settings = dict(
        model="tiny-v3",
        data=[corpus],
        tokenizer="bytes",
        seq_length=32,
        micro_batch_size=2,
        global_batch_size=4,
        max_steps=4,
        warmup_steps=1,
        learning_rate=3e-3,
        bias_update_speed=0.01,
        output_dir=str(output_dir),
        progress=False,
        tensorboard=False,
    )
    settings.update(overrides)
    return TrainArguments(**settings)


def _final_state(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.model_path) / "model.safetensors"))


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_from_mid_run_checkpoint_is_exact(corpus, tmp_path, streaming: bool) -> None:
    """A run stopped after step 3 (checkpoint at step 2) and re-run ends bit-identical to the uninterrupted run; a
    half-written checkpoint left by a killed save is ignored and removed. Streaming data resumes by skipping the
    rows already consumed."""
    options = {"streaming": True} if streaming else {"eval_holdout_rows": 4, "eval_every": 2}
    uninterrupted = train(_args(corpus, tmp_path / "a", save_every=2, **options))
    assert len(uninterrupted.losses) == 4 and uninterrupted.losses[-1] < uninterrupted.losses[0]

    class Stop(Exception):
        pass

    def stop_at_3(record) -> None:
        if record.step == 3:
            raise Stop

    args = _args(corpus, tmp_path / "b", save_every=2, **options)
    with pytest.raises(Stop):
        train(args, on_step=stop_at_3)
    checkpoints = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]
    partial = checkpoints / ".tmp-step-00000004"  # a save killed mid-write
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    resumed = train(args)
    assert resumed.resumed_from == str(checkpoints / "step-00000002")
    assert not partial.exists()
    assert resumed.losses == uninterrupted.losses
    assert resumed.eval_losses == uninterrupted.eval_losses
    expected, got = _final_state(uninterrupted), _final_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert any("e_score_correction_bias" in key and expected[key].abs().sum() > 0 for key in expected)

    from deepseek_moe import DeepseekMoeForCausalLM

    reloaded = DeepseekMoeForCausalLM.from_pretrained(resumed.model_path)
    bias_key = next(key for key in expected if key.endswith("e_score_correction_bias"))
    assert torch.equal(reloaded.state_dict()[bias_key], expected[bias_key])


def test_step_records_report_losses_and_loads(corpus, tmp_path) -> None:
    records = []
    train(_args(corpus, tmp_path, max_steps=2), on_step=records.append)
    assert [r.step for r in records] == [1, 2]
    record = records[0]
    assert record.loss == pytest.approx(record.lm_loss + 0.3 * record.mtp_loss + record.aux_loss, rel=1e-6)
    assert record.tokens == 4 * 32 and record.tokens_per_second > 0
    routers = [name for name in record.expert_load if name.startswith("model.layers.")]
    assert len(routers) == 3  # two MoE layers and the MTP layer
    # Every token of the global batch is routed to 4 experts in each main MoE layer.
    assert int(record.expert_load["model.layers.1.mlp.gate"].sum()) == 4 * 32 * 4
    assert record.load_cv > 0 and record.lr == pytest.approx(3e-3)


def test_lr_schedules() -> None:
    cosine = lr_lambda("cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    step = lr_lambda("step", warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    assert [step(50), step(60), step(89), step(90)] == pytest.approx([1.0, 0.316, 0.316, 0.316**2])


def test_config_file_and_overrides(tmp_path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("model: tiny-v2\nseq-length: 64\nlearning_rate: 1.0e-3\n")
    args = load_train_arguments(path, seq_length=None, max_steps=7)
    assert (args.model, args.seq_length, args.learning_rate, args.max_steps) == ("tiny-v2", 64, 1e-3, 7)
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.9, 0.95, 0.1, 1.0)
    path.write_text(json.dumps({"modle": "x"}))
    with pytest.raises(ValueError, match="unknown training settings"):
        load_train_arguments(path)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", "MISSING.txt"], "data file not found"),
        (["--config-overrides", '{"vocab_size": 200}'], "tokenizer has 259 tokens but the model's vocab_size is 200"),
        (["--ep-size", "3"], "ep_size=3 does not divide the 16 routed experts"),
        (["--ep-size", "2"], "ep_size=2 does not divide the world size 1"),
        (["--seq-length", "200000"], "exceeds the model's max_position_embeddings 163840"),
        (["--global-batch-size", "3", "--micro-batch-size", "2"], "not divisible by processes (1)"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_training(corpus, tmp_path, capsys, flags, message) -> None:
    output = tmp_path / "run"
    argv = ["train", "--model", "tiny-v3", "--tokenizer", "bytes", "--output-dir", str(output), "--no-progress"]
    if "--data" not in flags:
        argv += ["--data", corpus]
    assert main(argv + flags) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("deepseek-moe train: error:") and message in error, error
    assert not (output / "checkpoints").exists() and not (output / "final").exists()


def test_bad_input_from_the_console_script_prints_only_the_error(corpus, tmp_path) -> None:
    """As a user sees it: no warning (e.g. about TensorBoard) comes before the one-line error."""
    command = [str(Path(sys.executable).with_name("deepseek-moe")), "train", "--model", "tiny-v3"]
    command += ["--tokenizer", "bytes", "--output-dir", str(tmp_path / "run"), "--data", corpus, "--ep-size", "3"]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "deepseek-moe train: error: ep_size=3 does not divide the 16 routed experts"
    ], completed.stderr


def test_a_model_folder_with_only_tokenizer_json_trains_without_asking(corpus, tmp_path) -> None:
    """A saved model (its config.json names its code in `auto_map`) beside a bare tokenizer.json: finding the tokenizer
    must neither ask on the terminal whether to run that code nor warn about the config's model type."""
    from deepseek_moe.training.data import byte_tokenizer

    model = tmp_path / "model"
    DeepseekMoeForCausalLM(DeepseekMoeConfig.from_preset("tiny-v3")).save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    (model / "tokenizer_config.json").unlink()
    command = [str(Path(sys.executable).with_name("deepseek-moe")), "train", "--model", str(model), "--data", corpus]
    command += ["--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--seq-length", "16", "--no-progress"]
    command += ["--micro-batch-size", "1", "--global-batch-size", "1", "--no-tensorboard"]
    completed = subprocess.run(
        command, capture_output=True, text=True, stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    for noise in ("custom code", "trust_remote_code", "to instantiate a model of type"):
        assert noise not in completed.stdout + completed.stderr, completed.stderr[-2000:]


COMMON_FLAGS = ["--model", "tiny-v3", "--tokenizer", "bytes", "--seq-length", "32", "--micro-batch-size", "1"]
COMMON_FLAGS += ["--global-batch-size", "4", "--max-steps", "3", "--warmup-steps", "1", "--learning-rate", "3e-3"]
COMMON_FLAGS += ["--bias-update-speed", "0.01", "--no-progress", "--no-tensorboard"]


def _assert_two_processes_match_one(
    corpus: str, tmp_path: Path, launch: list[str], env: dict, flags: list[str], layout: list[str] = ()
):
    """Run `train` with `flags` in one process and through `launch` in two (with the parallel `layout` flags); the
    same global batches (each process takes 2 of the 4 micro-batches, or shares them in an expert/tensor-parallel
    group) must give the same losses (1e-5), the identical bias and the same final weights."""
    common = [*COMMON_FLAGS, "--data", corpus, *flags]
    single = train(load_train_arguments(None, **_flags_to_settings([*common, "--output-dir", str(tmp_path / "one")])))
    completed = subprocess.run(
        [*launch, "-m", "deepseek_moe.cli", "train", *common, *layout, "--output-dir", str(tmp_path / "two")],
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "train_result.json").read_text())
    assert (single.num_processes, two["num_processes"]) == (1, 2)
    assert two["losses"] == pytest.approx(single.losses, rel=1e-5)
    state_one = _final_state(single)
    state_two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert state_one.keys() == state_two.keys()
    for key in state_one:
        if key.endswith("e_score_correction_bias"):
            assert torch.equal(state_one[key], state_two[key]), key
        else:
            # AdamW's first steps move each weight by about lr·g/|g|, which turns rounding-level gradient differences
            # of near-zero entries into larger weight differences (seen: 1.4e-5 on one of 8192 entries).
            torch.testing.assert_close(state_two[key], state_one[key], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sync_each_batch", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_processes_match_one(corpus, tmp_path, sync_each_batch: bool) -> None:
    """`accelerate launch --num_processes 2` on CPU (gloo, one thread each), 2 accumulation micro-batches per process,
    DDP: as one process running the same global batch as 4 micro-batches."""
    # `--cpu` alone starts one process; `--multi_gpu` with ACCELERATE_USE_CPU starts torchrun's CPU processes (gloo).
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", _free_port()]
    flags = ["--sync-each-batch"] if sync_each_batch else []
    _assert_two_processes_match_one(corpus, tmp_path, launch, {"ACCELERATE_USE_CPU": "true"}, flags)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(["--fsdp", "--ep-size", "2"], id="fsdp_ep"),
        pytest.param(["--fsdp"], id="fsdp", marks=pytest.mark.slow),
        pytest.param(["--tp-size", "2", "--ep-size", "2"], id="tp_ep", marks=pytest.mark.slow),
    ],
)
def test_parallel_layouts_match_one_process(corpus, tmp_path, layout: list[str]) -> None:
    """`torchrun --nproc_per_node 2 -m deepseek_moe.cli train --fsdp [--ep-size 2] / --tp-size 2 --ep-size 2` (the
    distributed engine through deepseek_moe.training.parallel; gloo, one thread each): as one process."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port()]
    _assert_two_processes_match_one(corpus, tmp_path, launch, {}, [], layout)


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _flags_to_settings(flags: list[str]) -> dict:
    from deepseek_moe.cli import build_parser

    parsed = vars(build_parser().parse_args(["train", *flags]))
    return {k: v for k, v in parsed.items() if k not in ("command", "run", "config")}


@pytest.mark.slow
def test_parallel_resume_is_exact(corpus, tmp_path) -> None:
    """FSDP2 + EP(2) with a checkpoint at step 2 (torch's distributed checkpoint of the sharded model and optimizer):
    re-running after the run's end resumes from it and ends bit-identical."""
    flags = [*COMMON_FLAGS, "--data", corpus, "--max-steps", "4", "--save-every", "2", "--fsdp", "--ep-size", "2"]
    flags += ["--output-dir", str(tmp_path)]

    def run() -> None:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port()]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        completed = subprocess.run(
            [*launch, "-m", "deepseek_moe.cli", "train", *flags], env=env, capture_output=True, text=True, timeout=300
        )
        assert completed.returncode == 0, completed.stderr[-3000:]

    run()
    first = json.loads((tmp_path / "train_result.json").read_text())
    (tmp_path / "final").rename(tmp_path / "first")
    run()
    second = json.loads((tmp_path / "train_result.json").read_text())
    assert second["resumed_from"] == str(tmp_path / "checkpoints" / "step-00000002")
    assert second["losses"] == first["losses"]
    expected = load_file(str(tmp_path / "first" / "model.safetensors"))
    got = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.equal(expected[key], got[key]) for key in expected)
