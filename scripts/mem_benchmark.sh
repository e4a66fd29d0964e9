#!/usr/bin/env bash
# Activation and peak memory of vanilla, DIVISION, checkpointing, swap and ActNN on ResNet-50 and
# WRN-50-2 at 224x224, batches 64-512 plus the largest batch that fits, fp32 and bf16 (GPU).
# Writes logs/bench/memory.{json,md,png}. TINY=1 runs a CPU smoke test into OUT (default /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
if [ "${TINY:-0}" = 1 ]; then
  exec "$PY" benchmarks/memory_speed.py --mode memory --tiny --device cpu --out "${OUT:-/tmp/division-bench}/memory" "$@"
fi
exec "$PY" benchmarks/memory_speed.py --mode memory --find-max --out "${OUT:-logs/bench}/memory" "$@"
