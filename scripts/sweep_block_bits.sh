#!/usr/bin/env bash
# Hydra multirun over DIVISION's block size B and HFC bits Q (EXPERIMENT=demo by default), then the summary table. Each run's folder is named from its overrides under logs/multirun/.
# Extra arguments are Hydra overrides, e.g. trainer.amp=bf16 or method=vanilla for the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
EXPERIMENT=${EXPERIMENT:-demo}
SWEEP_DIR=${SWEEP_DIR:-logs/multirun/sweep_${EXPERIMENT}_$(date +%Y-%m-%d_%H-%M-%S)}
"$PY" train.py -m experiment="$EXPERIMENT" "division.block_size=${BLOCKS:-4,8,16}" \
  "division.hfc_bits=${BITS:-1,2,4}" hydra.sweep.dir="$SWEEP_DIR" "$@"
"$PY" scripts/summarize.py "$SWEEP_DIR" --markdown "$SWEEP_DIR/summary.md"
