#!/usr/bin/env bash
# One H200-class GPU, no internet, at most 8 minutes: Llama-3-8B, Llama-2-13B and Llama-3.2-1B
# shapes (random weights from their configs), LoRA and QLoRA, our training path against
# transformers.Trainer + PEFT, each side in its own process: steady tokens/s (median step after
# warm-up), MFU against the datasheet peak and the measured matmul ceiling, peak memory against
# the memory plan, issue 15's goals as flags, then (where the budget leaves time) hf_load_ratio on
# the card (see benchmarks/gpu_check.py). One JSON line a case
# as it ends (also appended to $LTM_GPU_CHECK_OUT/gpu_check.jsonl), the whole object last.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU
#   LTM_GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh    # the same code path on the CPU, shrunk
#
# A box with no package index gets what it lacks (bitsandbytes, liger-kernel, peft) as wheels:
# `bash benchmarks/gpu_wheels.sh` fills .whl/ where pip works, and this script installs them into
# a folder of its own (not the box's site-packages) before the check starts.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# python3 first: GPU images often have no plain `python`
PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$PYTHON" ]; then
    echo "gpu_check: no python3 or python on PATH; set PYTHON=/path/to/the/python/with/torch" >&2
    exit 1
fi
# the allocator setting the service gives its workers (backend/jobs/executor.py), for both sides,
# under the name the installed torch reads (PYTORCH_CUDA_ALLOC_CONF before torch 2.9)
alloc="${PYTORCH_ALLOC_CONF:-${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}}"
unset PYTORCH_ALLOC_CONF PYTORCH_CUDA_ALLOC_CONF
alloc_name="$("$PYTHON" -c 'from backend.jobs.executor import alloc_conf_name; print(alloc_conf_name())' \
    2>/dev/null || echo PYTORCH_ALLOC_CONF)"
export "$alloc_name=$alloc"
if compgen -G ".whl/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/ltm-gpu-site"
    if "$PYTHON" -m pip --version > /dev/null 2>&1; then
        PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index \
            --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    else  # a wheel is a zip of its package and its dist-info: unpacked, it is installed
        rm -rf "$site" && mkdir -p "$site"
        for wheel in .whl/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$site"; done
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: installed $(cd .whl && ls *.whl | sed 's/-py3.*//' | tr '\n' ' ')into $site" >&2
fi
export LTM_GPU_CHECK_BUDGET_S="${LTM_GPU_CHECK_BUDGET_S:-420}"
exec timeout --signal=TERM --kill-after=20 480 "$PYTHON" benchmarks/gpu_check.py
