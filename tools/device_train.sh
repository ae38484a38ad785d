#!/usr/bin/env bash
# One device session: the built-in Shakespeare model and the mini-replication, all at once on one GPU.
#
# The runs are small, so each process is bound by kernel-launch overhead, not by the GPU; running them
# side by side uses the card far better than one after another. Pure PyTorch: nothing is built here.
#
# Usage (from the repo root): CORPUS=path/to/shakespeare OUT=results_dir bash tools/device_train.sh
# Knobs (env): BUILTIN_STEPS, REP_STEPS, REP_SEEDS (empty: built-in model only), MAX_MIN (per-run cap, minutes).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
CORPUS=${CORPUS:-qsparse_infer/data/shakespeare-corpus.tar.xz}
OUT=${OUT:-runs/device_out}
RUNS=${RUNS:-runs/device}
BUILTIN_STEPS=${BUILTIN_STEPS:-1500}
REP_STEPS=${REP_STEPS:-1000}
REP_SEEDS=${REP_SEEDS-"0 1"}
MAX_MIN=${MAX_MIN:-6.5}
EXTRA=${EXTRA:-}  # e.g. "--device cpu --val-windows 4" for a dry run
mkdir -p "$OUT" "$RUNS"
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true) | tee "$RUNS/device.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$RUNS/device.txt"

# The built-in model: the defaults of `qsparse train` (hidden 384, 6 layers, context 512, S = 0.6).
python -m qsparse_infer.cli train --data "$CORPUS" --out "$RUNS/builtin" --steps "$BUILTIN_STEPS" \
  --keep-best --max-minutes "$MAX_MIN" $EXTRA > "$RUNS/builtin.log" 2>&1 &

# Mini-replication: one smaller model, the same recipe and token budget, only S / precision change.
REP="--hidden 256 --intermediate 768 --layers 4 --heads 4 --kv-heads 2 --seq-len 256 --batch-size 32
     --steps $REP_STEPS --warmup 100 --eval-every 100 --save-every 0 --max-minutes $MAX_MIN --window-bos doc"
for seed in $REP_SEEDS; do
  for s in 0 0.4 0.6 0.8; do
    python -m qsparse_infer.cli train --data "$CORPUS" --out "$RUNS/rep_s${s}_seed${seed}" --sparsity "$s" \
      --seed "$seed" $REP $EXTRA > "$RUNS/rep_s${s}_seed${seed}.log" 2>&1 &
  done
  python -m qsparse_infer.cli train --data "$CORPUS" --out "$RUNS/rep_fp_seed${seed}" --sparsity 0 \
    --precision fp --seed "$seed" $REP $EXTRA > "$RUNS/rep_fp_seed${seed}.log" 2>&1 &
done
wait
for f in "$RUNS"/*.log; do echo "== $f"; grep -v "it/s" "$f" | tail -n 3; done

# Bring back: the built-in checkpoint (final + best, no optimizer state) split in < 16 MB parts, and
# every run's curves, summary and log in one archive.
tar -C "$RUNS" -cf - --exclude trainer_state.pt builtin | split -b 15m - "$OUT/builtin.tar.part-"
(cd "$RUNS" && tar -czf - device.txt *.log */curves.json */training.json) > "$OUT/logs.tar.gz"
ls -la "$OUT"
