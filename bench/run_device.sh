#!/usr/bin/env bash
# One device call: build, CPU + GPU tests, benchmark, compute-sanitizer memcheck on a kernel test subset.
# Usage (from the repository root on the GPU machine): bash bench/run_device.sh [bench args...]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
REPO=$(pwd)
CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90 python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
cd /tmp  # import the installed package (with _C), not the source tree
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_linear_kernels_gpu.py" \
  "$REPO/tests/test_linear_kernels_cpu.py" > "$OUT/pytest.log" 2>&1
echo "pytest exit code: $?" | tee -a "$OUT/pytest.log"
grep -E "passed|failed|Error|error" "$OUT/pytest.log" | tail -15
timeout "${BENCH_TIMEOUT:-200}" python3 "$REPO/bench/kernels.py" --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
echo "bench exit code: $?"; grep -v "^wrote" "$OUT/bench.log" | cut -c1-150
if [ "${SANITIZE:-1}" = 1 ]; then
  timeout "${SAN_TIMEOUT:-120}" compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x \
    "$REPO/tests/test_linear_kernels_gpu.py" \
    -k "pack or (gemv_exact and 0.6) or glu or residual or gemm_exact or norm_fused_linear" \
    > "$OUT/sanitizer.log" 2>&1
  echo "compute-sanitizer memcheck exit code: $?" | tee -a "$OUT/sanitizer.log"
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -3
fi
