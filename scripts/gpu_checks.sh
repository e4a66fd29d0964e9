#!/usr/bin/env bash
# What a session with a GPU runs, in four parts of under 10 minutes each (one device call each):
#   bash scripts/gpu_checks.sh 1   # build, every GPU test, kernel bandwidth table         (~7 min)
#   bash scripts/gpu_checks.sh 2   # ResNet-50 bs 256: memory and speed of all 5 methods,
#                                  #   fp32 and bf16 + channels_last, largest batch          (~8 min)
#   bash scripts/gpu_checks.sh 3   # the same for vanilla and DIVISION under torch.compile,
#                                  #   and where a step's time goes (profiler)              (~8 min)
#   bash scripts/gpu_checks.sh 4   # accuracy: ResNet-18, full Fashion-MNIST, 3 seeds each   (~8 min)
# Results go to $RESULTS (default logs/bench/gpu); each part ends by packing them into
# $OUT/part<N>.tgz when OUT is set (the device tool returns at most 8 files per call).
# On the lent machine first run ../shared/tools/gpu-prep.sh here, carry .whl and .data, and start
# the command with the install line of its header; Fashion-MNIST is then read from .data.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: scripts/gpu_checks.sh 1|2|3|4}
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
RESULTS=${RESULTS:-logs/bench/gpu}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

# build for this GPU only (about a minute on 16 cores)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$RESULTS/build$PART.log" 2>&1 \
  || { tail -50 "$RESULTS/build$PART.log"; exit 1; }
"$PY" -c "import division, torch; assert torch.cuda.is_available(), 'no GPU'; assert division.cuda_extension_available(), 'division._C missing'; print(torch.cuda.get_device_name(), torch.__version__)"

pack() {
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/part$PART.tgz" "$RESULTS"; fi
}
trap pack EXIT

case "$PART" in
  1)
    "$PY" -m pytest -q -m gpu -rs --durations=15 tests 2>&1 | tee "$RESULTS/gpu_tests.log"
    "$PY" benchmarks/kernels.py --repeats 20 --smem-targets 24576 49152 98304 --out "$RESULTS/kernels"
    ;;
  2)
    for cfg in "off:" "bf16:--channels-last"; do
      amp=${cfg%%:*}; extra=${cfg#*:}; tag=$([ "$amp" = off ] && echo fp32 || echo bf16_cl)
      "$PY" benchmarks/memory_speed.py --mode memory --models resnet50 --batches 256 --amp "$amp" $extra \
        --out "$RESULTS/memory_resnet50_$tag"
      "$PY" benchmarks/memory_speed.py --mode speed --models resnet50 --batches 256 --amp "$amp" $extra \
        --warmup 3 --steps 5 --repeats 3 --out "$RESULTS/speed_resnet50_$tag"
    done
    "$PY" benchmarks/memory_speed.py --mode memory --models resnet50 --batches 256 --amp off \
      --methods vanilla division --find-max --max-search 4096 --out "$RESULTS/largest_batch_resnet50_fp32"
    ;;
  3)
    for cfg in "off:" "bf16:--channels-last"; do
      amp=${cfg%%:*}; extra=${cfg#*:}; tag=$([ "$amp" = off ] && echo fp32 || echo bf16_cl)
      "$PY" benchmarks/memory_speed.py --mode speed --compile --models resnet50 --batches 256 --amp "$amp" \
        $extra --methods vanilla division --warmup 3 --steps 5 --repeats 3 --out "$RESULTS/compiled_speed_resnet50_$tag"
      "$PY" benchmarks/memory_speed.py --mode memory --compile --models resnet50 --batches 256 --amp "$amp" \
        $extra --methods vanilla division --out "$RESULTS/compiled_memory_resnet50_$tag"
      "$PY" benchmarks/profile_step.py --amp "$amp" $extra --out "$RESULTS/profile_resnet50_$tag"
    done
    ;;
  4)
    DATA=${DATA:-$(test -d .data/fashion-mnist && echo .data/fashion-mnist || echo /usr/share/datasets/fashion-mnist)}
    "$PY" benchmarks/accuracy.py --variants vanilla "division B8 Q2" "actnn Q2" --seeds 0 1 2 \
      --overrides trainer.epochs=15 data.root="$DATA" --out "$RESULTS/accuracy_fashion_mnist"
    ;;
  *) echo "unknown part $PART" >&2; exit 2 ;;
esac
