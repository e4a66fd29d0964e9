#!/usr/bin/env bash
# ResNet-50 on ImageNet with DIVISION, 4 GPUs x 64, 120 epochs: the paper reports 75.82 top-1. NPROC=4 by default; the run folder is passed explicitly so every rank agrees on it.
# Extra arguments are Hydra overrides, e.g. trainer.amp=bf16 or method=vanilla for the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
RUN_DIR=${RUN_DIR:-logs/runs/resnet50_imagenet/$(date +%Y-%m-%d_%H-%M-%S)}
exec "$PY" -m torch.distributed.run --nproc_per_node="${NPROC:-4}" --log-dir="$RUN_DIR/torchrun" train.py experiment=resnet50_imagenet hydra.run.dir="$RUN_DIR" "$@"
