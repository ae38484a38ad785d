#!/usr/bin/env bash
# One device call for everything: build, the whole test suite (CPU + GPU), and the chosen benchmarks.
# Usage, from the repository root on the GPU machine:  bash bench/run_all_device.sh tests sweep diag kernels attention e2e profile fidelity
#   (serving work: serving batched_linear batched_decode prefill_gemm serve_bench attention_prefill mixed_step soak hostile http_overhead; lab: ncu ncu-src;
#   full precision, issue 18: dense = dense-tests dense-kernels dense-e2e, and dense-sanitizer)
# Options through the environment: SKIP_BUILD=1 (reuse a warm machine's install), SERVE_PEER= (serve_bench without the torch peer), PYTEST_FILES (test files for `tests`, relative to tests/; default all),
# PYTEST_K (a pytest -k filter), KERNELS_ONLY (shape filter for `kernels`), E2E_SPARSITY, E2E_SHAPE, E2E_ARGS (extra `qsparse bench`
# arguments, e.g. --no-peer), BL_ARGS (bench/batched_linear.py), DECODE_ARGS (bench/batched_decode.py; default --torch), REPS, SWEEP_ARGS (e.g. --only 2b4t --variants t1p,t1). `e2e-nopdl` repeats e2e with programmatic dependent launch off.
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
if [ -n "${SKIP_BUILD:-}" ] && (cd /tmp && python3 -c "import qsparse_infer._C" 2>/dev/null); then  # a warm machine's install
  echo "build: skipped (SKIP_BUILD; the installed package is this machine's last build)"
else
  CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90 python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
fi
cd /tmp  # import the installed package (with _C), not the source tree
serve_deps() {  # the HTTP stack (fastapi, uvicorn, openai, prometheus-client) from the wheels carried in .whl/
  [ -n "${SERVE_DEPS_DONE:-}" ] && return
  SERVE_DEPS_DONE=1
  python3 -c "import fastapi, uvicorn, openai, prometheus_client" 2>/dev/null && return
  if ls "$SRC"/.whl/*.whl >/dev/null 2>&1; then  # the wheels' README: no deps resolved, an overlay site folder
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$SRC"/.whl/*.whl \
      > "$OUT/serve-deps.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
      || echo "serve deps: install failed (see serve-deps.log)"
  else
    echo "serve deps: fastapi/uvicorn/openai missing and no .whl/ carried (the HTTP tests and benches skip)"
  fi
}
for what in "$@"; do
  case $what in
    tests)
      serve_deps
      timeout 400 python3 -m pytest -q -p no:cacheprovider --rootdir "$SRC" -c "$SRC/pyproject.toml" \
        $(for f in ${PYTEST_FILES:-.}; do echo "$SRC/tests/$f"; done) ${PYTEST_K:+-k "$PYTEST_K"} -rfEs 2>&1 \
        | tee "$OUT/pytest.log" | tail -40 ;;
    sanitizer)
      timeout ${SANITIZER_TIMEOUT:-150} compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x \
        --rootdir "$SRC" -c "$SRC/pyproject.toml" "$SRC/tests/kernels/test_linear_kernels_gpu.py" "$SRC/tests/kernels/test_attention_gpu.py" \
        "$SRC/tests/kernels/test_head_int8_gpu.py" "$SRC/tests/kernels/test_ceilings_gpu.py" "$SRC/tests/kernels/test_attention_prefill_gpu.py" "$SRC/tests/serving/test_serving_gpu.py" "$SRC/tests/kernels/test_decode_kernels_gpu.py" \
        -k "(gemv_t1_exact and 0.6 and randn) or early_exit or dependent_chain or identical_across_paths or (norm_fused_linear and t1p) or graph_replay_new_lengths or single_sequence_cache or lm_head_int8_kernel or stream_read_sums or sample_batch or lm_head_rows or lm_head_mma_accuracy or (gemm_skinny_shapes and 33) or (gemm_prefill_shapes and 130) or (gemm_prefill_epilogues and relu2) or current_stream_handle or chunks_workspace_blocks or (fused_rope_bit_identical and 20-5-128) or greedy_vector_and_tail" \
        > "$OUT/sanitizer.log" 2>&1; echo "memcheck exit $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -3 ;;
    persistent|persistent-tests)  # issue 16: the persistent decode step's GPU tests, memcheck on a small model, its profile
      timeout 300 python3 -m pytest -q -p no:cacheprovider --rootdir "$SRC" -c "$SRC/pyproject.toml" -rfEs \
        "$SRC/tests/gpu/test_persistent_step_gpu.py" ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/persistent-tests.log" | tail -25 ;;&
    persistent|persistent-sanitizer)
      timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x \
        --rootdir "$SRC" -c "$SRC/pyproject.toml" "$SRC/tests/gpu/test_persistent_step_gpu.py" \
        -k "raw_int32 and bitnet and True or small_grids and 7" > "$OUT/persistent-sanitizer.log" 2>&1
      echo "persistent memcheck exit $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/persistent-sanitizer.log" | tail -3 ;;&
    persistent|persistent-profile)
      for shape in ${PROFILE_SHAPES:-2b4t 8b}; do
        timeout 200 python3 "$SRC/bench/persistent_profile.py" --shape $shape --sparsity ${PROFILE_SPARSITY:-0,0.6} --prefetch ${PROFILE_PREFETCH:-off} --out "$OUT" 2>&1 \
          | tee "$OUT/persistent-profile-$shape.log" | tail -22
      done ;;
    persistent-tests|persistent-sanitizer|persistent-profile) ;;
    sweep)
      timeout 200 python3 "$SRC/bench/gemv_sweep.py" ${SWEEP_ARGS:-} --json "$OUT/gemv-sweep.json" 2>&1 | tee "$OUT/sweep.log" | grep -v "^  skip" ;;
    diag)
      timeout 150 python3 "$SRC/bench/decoder_diag.py" --sparsity 0,0.6 2>&1 | tee "$OUT/diag.log" | tail -45 ;;
    ncu)
      timeout 200 ncu --clock-control none -k regex:"gemv|select" --section SpeedOfLight --section WarpStateStats --section LaunchStats \
        --section Occupancy --section SourceCounters --section MemoryWorkloadAnalysis \
        python3 "$SRC/bench/ncu_targets.py" --parts gemv-variants > "$OUT/ncu.txt" 2>&1; echo "ncu exit $?"
      grep -E "gemv_kernel|select_kernel|Duration|Stall|Warp Cycles Per Issued|Achieved Occupancy|Registers Per|Memory Throughput" "$OUT/ncu.txt" | head -80 ;;
    ncu-src)  # where the decode-step kernels above their floors spend time, down to SASS lines (bench/ncu_targets.py)
      timeout 300 ncu --clock-control none -k regex:"${NCU_KERNELS:-attention_decode|sample_kernel|gemv_t1}" --set full \
        --import-source yes -f -o "$OUT/ncu-targets" python3 "$SRC/bench/ncu_targets.py" > "$OUT/ncu-targets-run.log" 2>&1
      echo "ncu exit $?"
      ncu -i "$OUT/ncu-targets.ncu-rep" --page details > "$OUT/ncu-targets.txt" 2>&1
      ncu -i "$OUT/ncu-targets.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu-targets-sass.csv" 2>&1
      grep -E "^  [a-zA-Z_].*\(|Duration|Warp Cycles Per Issued|Registers Per" "$OUT/ncu-targets.txt" | head -40 ;;
    kernels)
      timeout 300 python3 "$SRC/bench/kernels.py" --quick ${KERNELS_ONLY:+--only $KERNELS_ONLY} --out "$OUT" 2>&1 \
        | tee "$OUT/kernels-bench.log" | grep -v "^wrote" | cut -c1-160 ;;
    e2e|e2e-nopdl)
      pdl=1; [ "$what" = e2e-nopdl ] && pdl=0
      QSPARSE_PDL=$pdl timeout ${E2E_TIMEOUT:-400} python3 -m qsparse_infer.cli bench --shape ${E2E_SHAPE:-2b4t} \
        --sparsity ${E2E_SPARSITY:-0,0.4,0.6,0.8} --prompt-len 128 --new-tokens 256 --reps ${REPS:-3} ${E2E_ARGS:-} \
        --json "$OUT/$what-${E2E_SHAPE:-2b4t}.json" 2>&1 | tee "$OUT/$what-${E2E_SHAPE:-2b4t}.log" | tail -30 ;;
    dense|dense-tests)  # issue 18, the full-precision family: kernel + decoder GPU tests (~1-2 min)
      timeout 300 python3 -m pytest -q -p no:cacheprovider --rootdir "$SRC" -c "$SRC/pyproject.toml" -rfEs \
        "$SRC/tests/kernels/test_dense_kernels_gpu.py" "$SRC/tests/gpu/test_dense_model_gpu.py" 2>&1 \
        | tee "$OUT/dense-tests.log" | tail -30 ;;&
    dense|dense-kernels)  # the bf16 gather-GEMV at 8B / 70B shapes vs cuBLAS dense, the streaming ceiling and TEAL's
      # kernel when tools/fetch_teal.sh put it in .teal/ (carry it), + crossover (~1-2 min)
      timeout 300 python3 "$SRC/bench/dense_kernels.py" --crossover ${DENSE_KERNEL_ARGS:-} \
        $( [ -f "$SRC/.teal/kernels/sparse_gemv.py" ] && echo --teal "$SRC/.teal" ) --out "$OUT" 2>&1 | tee "$OUT/dense-kernels.log" | tail -50 ;;&
    dense|dense-e2e)  # qsparse bench on random bf16 weights of Llama-3-8B's shape with the torch bf16 peer (~3 min)
      timeout ${E2E_TIMEOUT:-400} python3 -m qsparse_infer.cli bench --shape llama8b-bf16 --sparsity ${DENSE_SPARSITY:-0,0.4,0.5,0.6} \
        --prompt-len 128 --new-tokens ${DENSE_NEW_TOKENS:-128} --reps ${REPS:-2} --json "$OUT/e2e-llama8b-bf16.json" 2>&1 \
        | tee "$OUT/e2e-llama8b-bf16.log" | tail -30 ;;&
    dense-sanitizer)  # memcheck over a few dense kernel cases (~1 min)
      timeout ${SANITIZER_TIMEOUT:-150} compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x \
        --rootdir "$SRC" -c "$SRC/pyproject.toml" "$SRC/tests/kernels/test_dense_kernels_gpu.py" \
        -k "(plain_matches and 257 and 0.5) or (plain_matches and 100-37) or splits or ties_go or silu_glu or residual_alias or large_d or graph_capture" \
        > "$OUT/dense-sanitizer.log" 2>&1; echo "memcheck exit $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/dense-sanitizer.log" | tail -3 ;;
    dense|dense-tests|dense-kernels|dense-e2e) ;;  # (the ;;& chain above ends here)
    serving)  # the batched decoder and its kernels, plus the single-sequence decoder they must not have changed
      timeout 400 python3 -m pytest -q -p no:cacheprovider --rootdir "$SRC" -c "$SRC/pyproject.toml" -rfEs \
        "$SRC/tests/serving/test_serving_gpu.py" "$SRC/tests/kernels/test_decode_kernels_gpu.py" "$SRC/tests/gpu/test_gpu_model_gpu.py" \
        2>&1 | tee "$OUT/serving-tests.log" | tail -30 ;;
    batched_linear)
      timeout ${BL_TIMEOUT:-300} python3 "$SRC/bench/batched_linear.py" ${BL_ARGS:-} --json "$OUT/batched-linear.json" 2>&1 \
        | tee "$OUT/batched-linear.log" | tail -60 ;;
    batched_decode)
      timeout ${BATCHED_TIMEOUT:-300} python3 "$SRC/bench/batched_decode.py" --batches ${BATCHES:-1,4,16,64} --sparsity 0,0.6 ${DECODE_ARGS:---torch} \
        --json "$OUT/batched-decode.json" 2>&1 | tee "$OUT/batched-decode.log" | tail -20 ;;
    serve_bench)  # issue 17: HTTP at N = 1, 4, 16, 64 beside the runner alone and the torch bf16 peer at B = N, and one
      # 4092-token prompt (+ 4 new: the 4096 context) among 16 streams (bench/serve.py; ~4-6 min with SERVE_SPARSITY=0, most of it the peer's
      # torch.compile per B: SERVE_PEER_EAGER=1 skips compiling). Writes after every phase, so a cut run keeps data.
      serve_deps
      timeout ${SERVE_TIMEOUT:-420} python3 "$SRC/bench/serve.py" --launch --shape 2b4t --sparsity ${SERVE_SPARSITY:-0} \
        --max-batch 64 --prefill-chunk ${SERVE_PREFILL_CHUNK:-512} --concurrency 1,4,16,64 --prompt-len 128 --new-tokens 128 \
        --min-requests 64 --min-rounds 3 --max-rounds 8 --long-prompt ${SERVE_LONG:-4092} --long-among 16 --runner ${SERVE_PEER---peer} \
        ${SERVE_PEER_EAGER:+--peer-eager} ${SERVE_ARGS:-} --json "$OUT/serve-h200.json" 2>&1 | tee "$OUT/serve.log" | tail -40 ;;
    attention_prefill)  # issue 17: prefill attention variant 1 vs 2 at the serving runner's chunks (bench/attention_prefill.py)
      timeout 120 python3 "$SRC/bench/attention_prefill.py" --json "$OUT/attention-prefill-h200.json" 2>&1 \
        | tee "$OUT/attention-prefill.log" ;;
    prefill_gemm)  # issue 17: the ternary GEMM variants at prefill widths beside cuBLAS int8 (bench/prefill_gemm.py, ~1 min)
      timeout ${PREFILL_GEMM_TIMEOUT:-200} python3 "$SRC/bench/prefill_gemm.py" ${PREFILL_GEMM_ARGS:-} --json "$OUT/prefill-gemm-h200.json" 2>&1 \
        | tee "$OUT/prefill-gemm.log" | grep -v "^wrote" | cut -c1-300 ;;
    mixed_step)  # issue 17: the runner's step time with prompt chunks beside decode rows, and a 4k prompt's chunks by start
      timeout ${MIXED_TIMEOUT:-240} python3 "$SRC/bench/mixed_step.py" --shape 2b4t --sparsity ${MIXED_SPARSITY:-0} --profile \
        ${MIXED_ARGS:-} --json "$OUT/mixed-step-h200.json" 2>&1 | tee "$OUT/mixed-step.log" | tail -45 ;;
    soak)  # issues 9 + 17: 64 clients for 2 minutes, every response checked, the hostile battery mixed in, server RSS
      serve_deps
      timeout ${SOAK_TIMEOUT:-300} python3 "$SRC/bench/soak.py" --launch --shape 2b4t --sparsity ${SOAK_SPARSITY:-0.6} --max-batch 64 \
        --clients 64 --seconds ${SOAK_SECONDS:-120} --max-tokens 128 --prompt-len 128 --hostile ${SOAK_HOSTILE:-light} \
        --json "$OUT/soak-h200.json" 2>&1 | tee "$OUT/soak.log" | tail -25 ;;
    hostile)  # issue 17: the hostile battery (bench/hostile.py), heavy cases included, against `qsparse serve` on the GPU
      serve_deps
      timeout 300 python3 "$SRC/bench/hostile.py" --launch --device cuda --heavy --timeout-header 5 --timeout-body 5 \
        --max-connections 1000 --json "$OUT/hostile.json" 2>&1 | tee "$OUT/hostile.log" | tail -30 ;;
    http_overhead)  # issue 17: the app + scheduler + uvicorn over a fake runner of fixed step time (no GPU work)
      serve_deps
      timeout 240 python3 "$SRC/bench/http_overhead.py" --step-ms ${HTTP_STEP_MS:-5} --concurrency 1,16,64 \
        --json "$OUT/http-overhead.json" 2>&1 | tee "$OUT/http-overhead.log" | tail -8 ;;
    attention)
      timeout 150 python3 "$SRC/bench/attention.py" ${ATTN_ARGS:---sweep} --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" ;;
    profile)
      timeout ${PROFILE_TIMEOUT:-500} python3 -m qsparse_infer.cli bench --shape 2b4t --sparsity 0,0.6 --lm-head int8 --profile --no-peer \
        --reps 2 --json "$OUT/e2e-profile.json" 2>&1 | tee "$OUT/profile.log" | tail -80 ;;
    fidelity)
      timeout 400 python3 "$SRC/bench/head_fidelity.py" --device cuda --skip-builtin --out "$OUT" 2>&1 \
        | tee "$OUT/fidelity.log" | tail -30 ;;
  esac
  echo "== $what done at $(( $(date +%s) - t0 )) s"
done
