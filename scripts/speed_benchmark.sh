#!/usr/bin/env bash
# Training img/s of vanilla, DIVISION, checkpointing, swap and ActNN on ResNet-50 and WRN-50-2 at
# 224x224, batches 64-512, fp32 and bf16: synthetic data on the GPU, CUDA-event timing after warm-up,
# median of repeats. Writes logs/bench/speed.{json,md,png}. TINY=1: CPU smoke test into OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
if [ "${TINY:-0}" = 1 ]; then
  exec "$PY" benchmarks/memory_speed.py --mode speed --tiny --device cpu --out "${OUT:-/tmp/division-bench}/speed" "$@"
fi
exec "$PY" benchmarks/memory_speed.py --mode speed --out "${OUT:-logs/bench}/speed" "$@"
