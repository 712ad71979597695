#!/usr/bin/env bash
# One H200-class GPU, no internet, at most 8 minutes: Llama-3-8B, Llama-2-13B and Llama-3.2-1B
# shapes (random weights from their configs), LoRA and QLoRA, our training path against
# transformers.Trainer + PEFT, each side in its own process: steady tokens/s (median step after
# warm-up), MFU against the datasheet peak and the measured matmul ceiling, peak memory against
# the memory plan, issue 15's goals as flags (see benchmarks/gpu_check.py). One JSON line a case
# as it ends (also appended to $LTM_GPU_CHECK_OUT/gpu_check.jsonl), the whole object last.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU
#   LTM_GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh    # the same code path on the CPU, shrunk
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the allocator setting the service gives its workers (backend/jobs/executor.py), for both sides
export PYTORCH_ALLOC_CONF="${PYTORCH_ALLOC_CONF:-${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}}"
unset PYTORCH_CUDA_ALLOC_CONF
export LTM_GPU_CHECK_BUDGET_S="${LTM_GPU_CHECK_BUDGET_S:-420}"
exec timeout --signal=TERM --kill-after=20 480 "${PYTHON:-python}" benchmarks/gpu_check.py
