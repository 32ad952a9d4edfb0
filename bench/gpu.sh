#!/usr/bin/env bash
# GPU figures for a lent GPU machine (device tool): python3 there holds PyTorch, tiktoken,
# safetensors, pandas and pyarrow; Ray is not needed. Output goes to $OUT/gpu.txt as well.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="${TMPDIR:-/tmp}/tiktoken"
python3 bench/gpu.py 2>&1 | tee "${OUT:-/tmp}/gpu.txt"
