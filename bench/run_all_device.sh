#!/usr/bin/env bash
# One device call for everything: build, the whole test suite (CPU + GPU), and the chosen benchmarks.
# Usage, from the repository root on the GPU machine:
#   bash bench/run_all_device.sh tests sweep diag kernels e2e profile fidelity
# Logs and results go to $OUT (the device tool brings them back).
set -u -o pipefail
export PYTHONUNBUFFERED=1
FINAL_OUT=${OUT:-/tmp/out}
OUT=$FINAL_OUT/r  # everything lands here and is packed into one archive at the end (the device tool
mkdir -p "$OUT"   # brings back at most 8 files)
trap 'tar czf "$FINAL_OUT/results.tgz" -C "$OUT" . && rm -rf "$OUT"' EXIT
SRC=$(pwd)
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90 python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
cd /tmp  # import the installed package (with _C), not the source tree
for what in "$@"; do
  case $what in
    tests)
      timeout 400 python3 -m pytest -q -p no:cacheprovider --rootdir "$SRC" -c "$SRC/pyproject.toml" "$SRC/tests" \
        -rfEs 2>&1 | tee "$OUT/pytest.log" | tail -40 ;;
    sanitizer)
      timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x \
        --rootdir "$SRC" -c "$SRC/pyproject.toml" "$SRC/tests/test_linear_kernels_gpu.py" \
        -k "pack or (gemv_exact and 0.6) or (gemv_t1_exact and 0.6) or glu or residual or gemm_exact or norm_fused_linear" \
        > "$OUT/sanitizer.log" 2>&1; echo "memcheck exit $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -3 ;;
    sweep)
      timeout 200 python3 "$SRC/bench/gemv_sweep.py" --json "$OUT/gemv-sweep.json" 2>&1 | tee "$OUT/sweep.log" | grep -v "^  skip" ;;
    diag)
      timeout 150 python3 "$SRC/bench/decoder_diag.py" --sparsity 0,0.6 2>&1 | tee "$OUT/diag.log" | tail -45 ;;
    ncu)
      timeout 200 ncu -k regex:"gemv|select" --section SpeedOfLight --section WarpStateStats --section LaunchStats \
        --section Occupancy --section SourceCounters --section MemoryWorkloadAnalysis \
        python3 "$SRC/bench/profile_gemv.py" > "$OUT/ncu.txt" 2>&1; echo "ncu exit $?"
      grep -E "gemv_kernel|select_kernel|Duration|Stall|Warp Cycles Per Issued|Achieved Occupancy|Registers Per|Memory Throughput" "$OUT/ncu.txt" | head -80 ;;
    kernels)
      timeout 300 python3 "$SRC/bench/kernels.py" --quick --out "$OUT" 2>&1 | tee "$OUT/kernels-bench.log" | grep -v "^wrote" | cut -c1-160 ;;
    profile)
      timeout 500 python3 -m qsparse_infer.cli bench --shape 2b4t --sparsity 0,0.6 --lm-head int8 --profile --no-peer \
        --reps 2 --json "$OUT/e2e-profile.json" 2>&1 | tee "$OUT/profile.log" | tail -80 ;;
    fidelity)
      timeout 400 python3 "$SRC/bench/head_fidelity.py" --device cuda --skip-builtin --out "$OUT" 2>&1 \
        | tee "$OUT/fidelity.log" | tail -30 ;;
    e2e)
      timeout 400 python3 -m qsparse_infer.cli bench --shape 2b4t --sparsity 0,0.4,0.6,0.8 --prompt-len 128 \
        --new-tokens 256 --reps ${REPS:-3} --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" | tail -30 ;;
  esac
  echo "== $what done at $(( $(date +%s) - t0 )) s"
done
