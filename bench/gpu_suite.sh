#!/usr/bin/env bash
# The GPU run, for a lent machine (CUDA 13, torch and Triton preinstalled, no network):
# build the CUDA extension, run the CUDA/Triton parity tests, then the benchmarks,
# and write one results file. Usage: bench/gpu_suite.sh OUTDIR (under 8 minutes).
set -uo pipefail
out=${1:?usage: bench/gpu_suite.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
stamp=$(date -u +%Y%m%dT%H%M%SZ)
result="$out/gpu_suite_$stamp.txt"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
status=0
{
  echo "# ahn_kernels GPU suite $stamp, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "## build"
  time AHN_CUDA_ARCHS=90a pip install --no-build-isolation --no-deps -q . || status=1
  python -m ahn_kernels info || status=1
  echo "## parity (CUDA and Triton on the GPU)"
  timeout 240 python -m pytest -q -m cuda tests/ -p no:cacheprovider || status=1
  echo "## benchmarks"
  timeout 180 python -m ahn_kernels bench --reps 10 || status=1
  echo "## exit status $status"
} 2>&1 | tee "$result"
exit $status
