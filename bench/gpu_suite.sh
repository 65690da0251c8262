#!/usr/bin/env bash
# The GPU run, for a lent machine (CUDA 13, torch and Triton preinstalled, no network):
# build the CUDA extension, run the CUDA/Triton parity tests, the reliability tests,
# the same tiny runs under compute-sanitizer, then the benchmarks, and write one
# results file. Usage: bench/gpu_suite.sh OUTDIR. Exits non-zero if any stage failed.
#
# Time budget (a lent machine runs one command for at most 10 minutes; we keep 8):
# every stage runs under `timeout`, and the caps add up to 480 s.
#   build 120 | parity 105 | reliability 75 (first Triton compiles of its shapes) |
#   sanitizers 110 (four tools at once, kernels already compiled) | benchmarks 70
set -uo pipefail
out=$(mkdir -p "${1:?usage: bench/gpu_suite.sh OUTDIR}" && cd "$1" && pwd) || exit 1  # absolute: we cd next
cd "$(dirname "$0")/.." || exit 1
stamp=$(date -u +%Y%m%dT%H%M%SZ)
result="$out/gpu_suite_$stamp.txt"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
pytest=(python -m pytest -q -rs -p no:cacheprovider -m cuda)
tiny=tests/test_gpu_reliability.py::test_tiny_run

# Runs the tiny GPU tests under one compute-sanitizer tool; its output goes to $logs/TOOL.log.
# The caching allocator hands out pieces of large blocks, which hides out-of-bounds
# accesses from memcheck: every tensor gets its own cudaMalloc here instead.
sanitize() {
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 110 "$sanitizer" --tool "$1" --error-exitcode 86 \
    --target-processes all "${pytest[@]}" "$tiny" >"$logs/$1.log" 2>&1
}

{
  status=0
  echo "# ahn_kernels GPU suite $stamp, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

  echo "## build"
  time AHN_CUDA_ARCHS=90a timeout 120 pip install --no-build-isolation --no-deps -q . || status=1
  python -m ahn_kernels info || status=1

  echo "## parity (CUDA and Triton against the fp64 references)"
  timeout 105 "${pytest[@]}" tests/ --ignore=tests/test_gpu_reliability.py || status=1

  echo "## reliability (tiny runs, CUDA graphs, side stream, offsets past 2^31: the int64 paths of Triton and CUDA)"
  timeout 75 "${pytest[@]}" tests/test_gpu_reliability.py || status=1

  echo "## sanitizers (compute-sanitizer on $tiny)"
  sanitizer=""
  for dir in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ]; then sanitizer="$dir/bin/compute-sanitizer"; break; fi
  done
  [ -n "$sanitizer" ] || sanitizer=$(command -v compute-sanitizer)
  if [ -z "$sanitizer" ]; then
    echo "FAILED: compute-sanitizer not found under \$CUDA_HOME/bin (CUDA_HOME=${CUDA_HOME:-unset}),"\
      "/usr/local/cuda/bin or on PATH"
    status=1
  else
    tools=(memcheck racecheck initcheck synccheck)
    pids=()
    for tool in "${tools[@]}"; do  # independent processes: the four share the GPU and the CPUs
      sanitize "$tool" &
      pids+=($!)
    done
    for i in "${!tools[@]}"; do
      tool=${tools[$i]}
      wait "${pids[$i]}"
      rc=$?
      echo "### $tool: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"
      grep -m 100 '^========= ' "$logs/$tool.log"  # the sanitizer's reports and its error summary
      tail -n 5 "$logs/$tool.log"  # pytest's summary line
      [ "$rc" -eq 0 ] || status=1
    done
  fi

  echo "## benchmarks"
  timeout 70 python -m ahn_kernels bench --reps 10 || status=1

  echo "## exit status $status"
  exit "$status"
} 2>&1 | tee "$result"
# The block runs in a subshell of the pipeline: its exit status is the suite's.
exit "${PIPESTATUS[0]}"
