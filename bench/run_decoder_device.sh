#!/usr/bin/env bash
# One device call for the decoder: build, GPU tests, end-to-end bench. Logs and results go to $OUT.
#   bash bench/run_decoder_device.sh [tests] [bench] [bench8b]
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90 python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
cd /tmp  # import the installed package, not the source tree
SRC=$OLDPWD
for what in "$@"; do
  case $what in
    tests)
      python3 -m pytest -q -p no:cacheprovider --rootdir "$SRC" -c "$SRC/pyproject.toml" \
        "$SRC/tests/test_decode_kernels_gpu.py" "$SRC/tests/test_gpu_model_gpu.py" "$SRC/tests/test_generation.py" \
        -s -rA 2>&1 | grep -v "^PASSED" | tee "$OUT/pytest.log" | tail -60
      ;;
    bench)
      python3 -m qsparse_infer.cli bench --shape 2b4t --sparsity 0,0.4,0.6,0.8 --prompt-len 128 --new-tokens 256 \
        --reps ${REPS:-3} --json "$OUT/e2e.json" 2>&1 | tee "$OUT/bench.log" | tail -30
      ;;
    diag)
      timeout 150 python3 "$SRC/bench/decoder_diag.py" --sparsity 0,0.6 2>&1 | tee "$OUT/diag.log" | tail -45
      ;;
    bench8b)
      python3 -m qsparse_infer.cli bench --shape 8b --sparsity 0,0.6 --prompt-len 128 --new-tokens 256 \
        --reps 2 --json "$OUT/e2e-8b.json" 2>&1 | tee "$OUT/bench8b.log" | tail -20
      ;;
  esac
  echo "$what done at $(( $(date +%s) - t0 )) s"
done
