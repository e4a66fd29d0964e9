#!/usr/bin/env bash
# ResNet-164 on CIFAR-100 with DIVISION (B=8, Q=2), 200 epochs, lr 0.15: the paper reports 76.74 top-1.
# Extra arguments are Hydra overrides, e.g. trainer.amp=bf16 or method=vanilla for the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
exec "$PY" train.py experiment=resnet164_cifar100 "$@"
