#!/usr/bin/env bash
# The kernels' CPU twin under AddressSanitizer. The twin runs every kernel body's own indexing on
# the CPU; built with -fsanitize=address (DIVISION_SANITIZE=address, setup.py), an access outside a
# tensor or a block's shared memory is reported there, where a GPU would fault or read garbage.
# Builds division._C in a temporary copy of the tree (tracked files, uncommitted edits included;
# about 5 minutes on 2 cores) and runs the twin tests against it.
#
#   bash scripts/twin_asan.sh                 # tests/test_cuda_ext.py, test_mask_kernels.py, test_codec.py
#   bash scripts/twin_asan.sh -k plane_words  # more pytest arguments
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
(cd "$ROOT" && git ls-files -z | xargs -0 cp --parents -t "$WORK")
cd "$WORK"
echo "twin_asan: building division._C with AddressSanitizer in $WORK"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi  # as the Makefile
if ! DIVISION_SANITIZE=address TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} \
    "$PY" setup.py build_ext --inplace > build.log 2>&1; then
  tail -30 build.log
  exit 1
fi
# libasan first; libstdc++ preloaded too, or ASan cannot intercept the C++ throws of TORCH_CHECK
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
export ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:halt_on_error=1
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ext.py tests/test_mask_kernels.py tests/test_codec.py "$@"
