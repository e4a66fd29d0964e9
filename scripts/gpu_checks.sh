#!/usr/bin/env bash
# What a session with a GPU runs first (about 15 minutes on an H100): build the kernels, run the GPU
# tests (bit-identity with the reference, >2^31 indexing, CUDA vs reference training curves), then
# the kernel bandwidth table and ResNet-50 bs 256 memory and speed of every method, into logs/bench/.
# The full grids are scripts/mem_benchmark.sh and scripts/speed_benchmark.sh (longer).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -c "import division, torch; assert torch.cuda.is_available(); assert division.cuda_extension_available(), 'division._C missing'"
"$PY" -m pytest -q -m gpu tests/test_cuda_ext.py
"$PY" benchmarks/kernels.py --out logs/bench/kernels.json
"$PY" benchmarks/memory_speed.py --mode memory --models resnet50 --batches 256 --out logs/bench/memory_resnet50_bs256
"$PY" benchmarks/memory_speed.py --mode speed --models resnet50 --batches 256 --amp off --out logs/bench/speed_resnet50_bs256
