#!/usr/bin/env bash
# DenseNet-161 on ImageNet with DIVISION, 8 GPUs x 64, 120 epochs, lr 0.2: the paper reports 77.86 top-1. NPROC=8 by default.
# Extra arguments are Hydra overrides, e.g. trainer.amp=bf16 or method=vanilla for the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
RUN_DIR=${RUN_DIR:-logs/runs/densenet161_imagenet/$(date +%Y-%m-%d_%H-%M-%S)}
exec "$PY" -m torch.distributed.run --nproc_per_node="${NPROC:-8}" --log-dir="$RUN_DIR/torchrun" train.py experiment=densenet161_imagenet hydra.run.dir="$RUN_DIR" "$@"
