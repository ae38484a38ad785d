#!/usr/bin/env bash
# One device call: build, CPU + GPU tests, compute-sanitizer memcheck on a kernel test subset, benchmark.
# Usage (from the repository root on the GPU machine): bash bench/run_device.sh [bench args...]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90 python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
cd /tmp
REPO=$OLDPWD
timeout 300 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_linear_kernels_gpu.py" "$REPO/tests/test_linear_kernels_cpu.py" \
  2>&1 | tee "$OUT/pytest.log" | tail -25
if [ "${SANITIZE:-1}" = 1 ]; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x \
    "$REPO/tests/test_linear_kernels_gpu.py" -k "pack or (gemv_exact and 0.6) or glu or residual or gemm_exact or norm_fused_linear or (topk_bit_exact and 997 and ties)" \
    > "$OUT/sanitizer.log" 2>&1
  echo "compute-sanitizer memcheck exit code: $?" | tee -a "$OUT/sanitizer.log"
  tail -5 "$OUT/sanitizer.log"
fi
timeout "${BENCH_TIMEOUT:-300}" python3 "$REPO/bench/kernels.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
