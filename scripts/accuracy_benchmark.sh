#!/usr/bin/env bash
# ResNet-18 on Fashion-MNIST: vanilla vs DIVISION (B=8 Q=2 and a small B/Q grid) vs ActNN, same recipe
# (10 epochs, bs 256, lr 0.1, cosine), seeds 0 1 2; final top-1 mean and spread.
# Writes logs/bench/accuracy.{json,md,png}. TINY=1: a CPU smoke test on synthetic data into OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
if [ "${TINY:-0}" = 1 ]; then
  exec "$PY" benchmarks/accuracy.py --tiny --seeds 0 1 --out "${OUT:-/tmp/division-bench}/accuracy" "$@"
fi
exec "$PY" benchmarks/accuracy.py --out "${OUT:-logs/bench}/accuracy" "$@"
