#!/usr/bin/env bash
# What a session with a GPU runs, as named steps that fit device calls of under 10 minutes:
#   bash scripts/gpu_checks.sh tests kernels profile   # every GPU test, kernel bandwidth, profile fp32
#   bash scripts/gpu_checks.sh speed                   # ResNet-50 bs 256: memory and speed of all 5
#                                                      #   methods, fp32 and bf16 + channels_last
#   bash scripts/gpu_checks.sh largest_batch           # the largest batch vanilla and DIVISION fit
#   bash scripts/gpu_checks.sh accuracy                # ResNet-18, full Fashion-MNIST, 3 seeds each
#   bash scripts/gpu_checks.sh compile profile_bf16    # vanilla and DIVISION under torch.compile
#                                                      #   (compile_fp32: fp32 only)
#   bash scripts/gpu_checks.sh vit                     # ViT-B/16 bs 64: memory and speed, fp32 and bf16
#   bash scripts/gpu_checks.sh host                    # host us per layer call: stock, exact, division
#   bash scripts/gpu_checks.sh cudagraphs              # vanilla and DIVISION, bf16 + channels_last, under
#                                                      #   torch.compile mode=reduce-overhead: img/s
# Each step has its own time limit and log ($RESULTS/<step>.log); a failing step is recorded in
# $RESULTS/steps.tsv and the next one still runs. Results go to $RESULTS (default logs/bench/gpu).
# On the lent machine first run ../shared/tools/gpu-prep.sh here, carry .whl and .data: the wheels
# are installed to /tmp/site when hydra is missing, and Fashion-MNIST is read from .data.
# The lent machine's copy of .git is the session's starting one: start the command with
# `export DIVISION_GIT_COMMIT=<git rev-parse --short HEAD here>` so the results name the code that ran.
# ACCURACY_OVERRIDES adds Hydra overrides to the accuracy runs (e.g. "trainer.amp=bf16").
# DEADLINE=<seconds> caps the whole run (see step below); REPEATS sets the speed runs' repeats (3);
# METHODS the methods of the `speed` step's memory and speed runs (default all five: vanilla,
# division, checkpoint, swap, actnn; swap and actnn take about half of its time).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: scripts/gpu_checks.sh STEP..." >&2; exit 2; }
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
RESULTS=${RESULTS:-logs/bench/gpu}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
START=$SECONDS

if ! "$PY" -c "import hydra, lmdb" 2>/dev/null && [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
# build for this GPU only (about a minute on 16 cores)
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$RESULTS/build.log" 2>&1; then
  tail -50 "$RESULTS/build.log"; exit 1
fi
"$PY" -c "import division, torch; assert torch.cuda.is_available(), 'no GPU'; assert division.cuda_extension_available(), 'division._C missing'; print(torch.cuda.get_device_name(), torch.__version__)" \
  || exit 1
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true

# step NAME SECONDS COMMAND...: run with a time limit, log, record the exit status. With
# DEADLINE=<seconds> (from the script's start) a step gets at most the time left, and a step with
# under 30 s left is skipped (status "skipped"): the call ends inside the device's per-call limit
# and everything measured until then comes back.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -lt 30 ]; then
      printf '%s\tskipped\t0s\n' "$name" | tee -a "$RESULTS/steps.tsv"; return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)"
  # SIGINT first: pytest then prints its summary of what ran, Python scripts their traceback
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=$?
  printf '%s\t%s\t%ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$RESULTS/steps.tsv"
}

speed_pair() {  # tag amp extra...: memory, then speed, of the METHODS (each model built once)
  local tag=$1 amp=$2; shift 2
  local methods=(${METHODS:-vanilla division checkpoint swap actnn})
  step "memory_speed_$tag" 300 "$PY" benchmarks/memory_speed.py --mode both --models resnet50 --batches 256 \
    --amp "$amp" "$@" --methods "${methods[@]}" --warmup 3 --steps 5 --repeats "${REPEATS:-3}" \
    --out "$RESULTS/memory_speed_resnet50_$tag"
}

compiled_pair() {  # tag amp extra...: vanilla and DIVISION under torch.compile, one compile each
  local tag=$1 amp=$2; shift 2
  step "compiled_$tag" 300 "$PY" benchmarks/memory_speed.py --mode both --compile --models resnet50 \
    --batches 256 --amp "$amp" "$@" --methods vanilla division --warmup 3 --steps 5 --repeats "${REPEATS:-3}" \
    --out "$RESULTS/compiled_resnet50_$tag"
}

DATA=${DATA:-$(test -d .data/fashion-mnist && echo .data/fashion-mnist || echo /usr/share/datasets/fashion-mnist)}
for s in "$@"; do
  case "$s" in
    # -v: a line per test as it ends, and each failure's traceback as it happens (tests/conftest.py),
    # so a run stopped at its limit still shows which failed and why. A device fault stops the
    # tests (the CUDA context is lost) and names its test in gpu_fault.txt: that test alone runs
    # again under compute-sanitizer's memcheck, which names the kernel and the access.
    tests)
      rm -f "$RESULTS/gpu_fault.txt"
      step gpu_tests 200 env DIVISION_TEST_TRACEBACKS=1 DIVISION_FAULT_FILE="$RESULTS/gpu_fault.txt" \
        "$PY" -m pytest -v -m gpu -rs --durations=15 -p no:cacheprovider tests
      if [ -s "$RESULTS/gpu_fault.txt" ]; then
        step sanitize 150 "${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}" \
          --tool memcheck --print-limit 20 "$PY" -m pytest -x -p no:cacheprovider "$(head -1 "$RESULTS/gpu_fault.txt")"
      fi ;;
    kernels) step kernels 240 "$PY" benchmarks/kernels.py --repeats 20 --smem-targets 24576 49152 98304 \
      --decompress-paths --out "$RESULTS/kernels" ;;
    profile) step profile_fp32 120 "$PY" benchmarks/profile_step.py --out "$RESULTS/profile_resnet50_fp32" ;;
    profile_bf16) step profile_bf16 120 "$PY" benchmarks/profile_step.py --amp bf16 --channels-last \
      --out "$RESULTS/profile_resnet50_bf16_cl" ;;
    speed)
      speed_pair fp32 off
      speed_pair bf16_cl bf16 --channels-last ;;
    largest_batch) step largest_batch 200 "$PY" benchmarks/memory_speed.py --mode memory --models resnet50 \
      --batches 256 --amp off --methods vanilla division --find-max \
      --out "$RESULTS/largest_batch_resnet50_fp32" ;;
    host)
      step host_fp32 60 "$PY" benchmarks/host_overhead.py --device cuda --out "$RESULTS/host_overhead_fp32"
      step host_bf16_cl 60 "$PY" benchmarks/host_overhead.py --device cuda --amp bf16 --channels-last \
        --out "$RESULTS/host_overhead_bf16_cl" ;;
    compile_fp32) compiled_pair fp32 off ;;
    # torch.compile replaying CUDA graphs: no host time per op (is the bf16 step bound by the host?)
    cudagraphs) step cudagraphs_bf16_cl 300 "$PY" benchmarks/memory_speed.py --mode speed --compile reduce-overhead \
      --models resnet50 --batches 256 --amp bf16 --channels-last --methods vanilla division --warmup 3 --steps 5 \
      --repeats "${REPEATS:-3}" --out "$RESULTS/cudagraphs_resnet50_bf16_cl" ;;
    compile)
      compiled_pair fp32 off
      compiled_pair bf16_cl bf16 --channels-last ;;
    vit)
      for amp in off bf16; do
        step "vit_$amp" 300 "$PY" benchmarks/memory_speed.py --mode both --models vit_b_16 --batches 64 \
          --amp "$amp" --methods vanilla division checkpoint --warmup 3 --steps 5 --repeats "${REPEATS:-3}" \
          --out "$RESULTS/memory_speed_vit_b_16_$amp"
      done ;;
    accuracy) step accuracy 480 "$PY" benchmarks/accuracy.py --variants vanilla "division B8 Q2" --seeds 0 1 2 \
      --jobs 6 --overrides trainer.epochs="${EPOCHS:-15}" data.root="$DATA" ${ACCURACY_OVERRIDES:-} --out "$RESULTS/accuracy_fashion_mnist" ;;
    accuracy_actnn) step accuracy_actnn 300 "$PY" benchmarks/accuracy.py --variants "actnn Q2" --seeds 0 1 2 \
      --jobs 3 --overrides trainer.epochs="${EPOCHS:-15}" data.root="$DATA" ${ACCURACY_OVERRIDES:-} --out "$RESULTS/accuracy_fashion_mnist_actnn" ;;
    *) echo "unknown step $s" >&2 ;;
  esac
done
echo "=== done in $((SECONDS - START))s"; cat "$RESULTS/steps.tsv"
