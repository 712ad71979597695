#!/usr/bin/env bash
# Wheels for a GPU box with no package index: what gpu_check.sh needs that such a box may lack.
# Run it where pip can reach an index; it fills .whl/ (git-ignored), and gpu_check.sh installs
# whatever it finds there into a folder of its own before it starts. The versions are the ones
# this checkout is tested with where they are installed here, else the pins below.
#
#   bash benchmarks/gpu_wheels.sh            # here: .whl/ of about 44 MB
#   bash benchmarks/gpu_check.sh             # there, with .whl/ copied along
#
# - bitsandbytes: the QLoRA cases (4-bit); its wheel carries CUDA 11.8–13.2 builds.
# - liger-kernel: --kernels liger (fused RMSNorm, RoPE, SwiGLU, linear cross-entropy), pure Python
#   over Triton, which CUDA builds of torch bring.
# - peft: the LoRA layers both sides train with, at the version the tests pin down, and
#   accelerate, which peft imports and the Trainer needs (GPU images usually have it, but not
#   always a version peft accepts).
# torch and transformers are the box's own: a CUDA build of torch does not travel as a wheel of a
# few MB, and transformers must match it less closely than peft must match transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
TARGET_PY="${GPU_PYTHON_VERSION:-3.12}"  # the GPU image's interpreter
installed() {  # the version installed here, else the fallback
    "$PYTHON" - "$1" "$2" <<'EOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    print(sys.argv[2])
EOF
}
wanted=(
    "bitsandbytes==$(installed bitsandbytes 0.50.2)"
    "liger-kernel==$(installed liger-kernel 0.8.5)"
    "peft==$(installed peft 0.21.2)"
    "accelerate==$(installed accelerate 1.16.0)"
)
mkdir -p .whl
rm -f .whl/*.whl
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
    --implementation cp "${platforms[@]}" -d .whl "${wanted[@]}"
ls -l .whl/*.whl | awk '{printf "%s  %.1f MB\n", $NF, $5 / 1048576}'
du -sh .whl | awk '{print "in all: " $1 " (the device tool carries at most 64 MiB with the checkout)"}'
