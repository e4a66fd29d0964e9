#!/usr/bin/env bash
# DenseNet-121 on CIFAR-100 with DIVISION (B=8, Q=2), 100 epochs: the paper reports 79.30 top-1.
# Extra arguments are Hydra overrides, e.g. trainer.amp=bf16 or method=vanilla for the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
exec "$PY" train.py experiment=densenet121_cifar100 "$@"
