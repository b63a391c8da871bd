#!/usr/bin/env bash
# The GPU benchmark in one go (`make bench-gpu`, under 8 minutes on one H100/H200): the engine at
# 512² with random SD-1.5-shaped fp16 weights (= InstaFlow-0.9B's arithmetic), eager against
# channels_last, torch.compile and CUDA graphs, batch 1 up to the best batch, achieved TFLOP/s
# against the card's peak, the 25-step loop as the baseline; then the real worker path on CUDA
# (bench/cpu.py on the embedded stack: SQLite ledger and broker, local objects) with those weights.
# Writes everything to ${BENCH_OUT:-var/bench-gpu}/gpu.log; docs/performance.md says how to read it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${BENCH_OUT:-var/bench-gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: > "$LOG"
run() { echo "+ $*" | tee -a "$LOG"; timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | grep -v -e Warning -e warn | tee -a "$LOG" || echo "step failed or timed out: $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee -a "$LOG" || true
# 1. eager and channels_last over the batch sizes (cheap), 2. compiled and CUDA graphs at batch 1 and 16
#    (each shape compiles once), 3. the 25-step baseline at batch 1.
run "$PY" -m bench.gpu --arch sd15 --dtype fp16 --batch 1,8,16,32,64 --variants eager,channels_last --repeats 5
STEP_TIMEOUT=300 run "$PY" -m bench.gpu --arch sd15 --dtype fp16 --batch 1,16 --variants compile,cudagraphs --repeats 5
run "$PY" -m bench.gpu --arch sd15 --dtype fp16 --batch 1 --steps 25 --repeats 3
# 4. the worker path on CUDA: claim → generate → encode → store → QC → record, through a Celery worker.
CKPT="$OUT/sd15-random"
[ -f "$CKPT/model_index.json" ] || run "$PY" -m bench.gpu --save-checkpoint "$CKPT" --dtype fp16
#    Twice: the model in the worker's process, then in a device process of its own (worker/device.py).
for DEVICE_PROCESS in 0 1; do
  INSTABATCH_DEVICE=cuda INSTABATCH_DEVICE_PROCESS=$DEVICE_PROCESS INSTABATCH_ENCODE_WORKERS=${ENCODE_WORKERS:-12} \
    INSTABATCH_PNG_COMPRESS_LEVEL=1 \
    run "$PY" -m bench.cpu --model "$CKPT" --items 512 --micro-batch 32 --size 512 --threads 4 --mode both
done
grep '^RESULT' "$LOG" > "$OUT/results.txt" || true
echo "results: $OUT/results.txt"
