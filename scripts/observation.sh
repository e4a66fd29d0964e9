#!/usr/bin/env bash
# The paper's observation: gradients from the LFC only, the HFC only and DIVISION's reconstruction
# against the exact gradient, per layer and whole model, for B = 2 4 8 16, at initialisation and
# after training (this script first trains the demo for EPOCHS epochs to get a checkpoint).
# Writes logs/bench/observation.{json,md,png}. TINY=1: a CPU smoke test into OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
OUT=${OUT:-$([ "${TINY:-0}" = 1 ] && echo /tmp/division-bench || echo logs/bench)}
RUN="$OUT/observation_checkpoint"
if [ "${TINY:-0}" = 1 ]; then
  "$PY" train.py experiment=demo data=synthetic data.num_train=16 data.num_val=8 trainer.device=cpu \
    trainer.batch_size=4 trainer.max_steps=2 trainer.max_val_steps=1 hydra.run.dir="$RUN"
  exec "$PY" benchmarks/observation.py --tiny --checkpoint "$RUN/last.pt" --out "$OUT/observation" "$@"
fi
"$PY" train.py experiment=demo method=vanilla data.train_subset=3000 trainer.epochs="${EPOCHS:-3}" ${TRAIN_OVERRIDES:-} hydra.run.dir="$RUN"
exec "$PY" benchmarks/observation.py --checkpoint "$RUN/last.pt" --out "$OUT/observation" "$@"
