#!/usr/bin/env bash
# GPU check: inference (1024², 30 steps, fp16, offload presets), one training step per memory configuration, the
# step with compile / channels-last / fused AdamW on and off, get_face_info throughput, real-size SDXL with random
# weights (nothing downloaded), one table. ~15 min on one GPU (estimate: the compile rows compile for minutes).
#
#   bash benchmarks/gpu_check.sh                         # CUDA machine, after the README's two set-up commands
#   bash benchmarks/gpu_check.sh --json gpu_check.json   # also the rows as JSON
#   bash benchmarks/gpu_check.sh --reduced               # tiny models, tiny sizes (CPU; what the test suite runs)
#   CUDA_VISIBLE_DEVICES=1 bash benchmarks/gpu_check.sh  # another GPU
#
# Output format: docs/training.md, "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# fewer allocator retries on large real-size blocks; harmless on CPU
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# $PYTHON, else the environment `make install` made, else whatever python is on PATH
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
