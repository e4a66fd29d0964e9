#!/usr/bin/env bash
# ResNet-18 on CIFAR-10 with DIVISION (B=8, Q=2), 100 epochs: the paper reports 94.66 top-1.
# Extra arguments are Hydra overrides, e.g. trainer.amp=bf16 or method=vanilla for the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
exec "$PY" train.py experiment=resnet18_cifar10 "$@"
