#!/usr/bin/env bash
# The GPU check, in one command for a machine with an NVIDIA GPU (the project's lent H200; its image already holds
# torch, transformers, triton, accelerate, peft and pytest, so nothing is installed): the tests whose kernels only
# compile and run natively on a GPU, then the GPU benchmarks. Everything lands in $OUT (default ./gpu_out): one log
# per step and summary.txt with each step's exit status. Sized to finish in under 8 minutes on an H200.
#
#     OUT=/tmp/gpu bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
: >"$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

step environment 30 bash -c "nvidia-smi; $PYTHON -c 'import torch, transformers, triton; \
print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())'"
# Kernel tests: natively compiled Triton (no interpreter: conftest picks it only without nvidia-smi).
step kernel_tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_mla_kernel.py tests/test_moe_kernels.py \
    tests/test_fp8_training.py tests/test_fp8_kernels.py tests/test_fp8_inference.py tests/test_generate_cli.py
step fp8_inference 120 "$PYTHON" benchmarks/fp8_inference.py --reps 5
step fp8_model 90 "$PYTHON" benchmarks/fp8_model.py --expert-scale 16
step moe_layer_bf16 45 "$PYTHON" benchmarks/moe_layer.py --dtype bfloat16 --scale 1 --expert-scale 1 --reps 5
step training_bf16 45 "$PYTHON" benchmarks/training.py --dtype bfloat16 --steps 5
cat "$OUT/summary.txt"
