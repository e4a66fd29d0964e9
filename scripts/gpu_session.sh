#!/usr/bin/env bash
# One call of the device tool in a GPU session: scripts/gpu_checks.sh STEP... under a deadline,
# with its results packed into $OUT/NAME.tgz every 45 s (PACK_EVERY) and at the end, so that a call
# stopped at its limit still brings back everything measured until then (the tool returns at most
# 8 files, so the results travel as one archive).
#   export DIVISION_GIT_COMMIT=<git rev-parse --short HEAD, here>   # the device's .git is stale
#   bash scripts/gpu_session.sh part1 480 tests kernels speed profile_bf16
# Carry .whl (../shared/tools/gpu-prep.sh makes it; .data too for the accuracy step). DEADLINE
# (the second argument, seconds) should end the checks about a minute inside the call's timeout_s:
# a step gets at most the time left, and one with under 30 s left is skipped and recorded.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { echo "usage: scripts/gpu_session.sh NAME DEADLINE STEP..." >&2; exit 2; }
name=$1 deadline=$2
shift 2
: "${OUT:?OUT must name the output folder of the device tool}"
export RESULTS=${RESULTS:-/tmp/division_results} DEADLINE=$deadline
mkdir -p "$RESULTS"

pack() {  # written beside, then renamed: a pack cut off mid-way leaves the last whole one
  tar czf "$OUT/.$name.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null \
    && mv "$OUT/.$name.tgz" "$OUT/$name.tgz"
}

(while sleep "${PACK_EVERY:-45}"; do pack; done) &
packer=$!
bash scripts/gpu_checks.sh "$@"
rc=$?
kill "$packer" 2>/dev/null
wait "$packer" 2>/dev/null
pack
exit "$rc"
