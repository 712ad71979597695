#!/usr/bin/env bash
# One H200-class GPU, no internet, at most 8 minutes: LoRA and QLoRA tokens/s, MFU against the
# measured bf16 matmul ceiling, peak memory and the ratio against HF Trainer + PEFT, for 1B- and
# 7B-shaped Llamas with random weights (see benchmarks/gpu_check.py). The last line is JSON.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU
#   LTM_GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh    # the same code path on the CPU, shrunk
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export LTM_GPU_CHECK_BUDGET_S="${LTM_GPU_CHECK_BUDGET_S:-420}"
exec timeout --signal=TERM --kill-after=20 480 "${PYTHON:-python}" benchmarks/gpu_check.py
