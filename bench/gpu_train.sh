#!/usr/bin/env bash
# GPU check of the trainer: `make train-llama-60m` (fp16 with dynamic loss scaling, ZeRO-1, softmax-1 + OrthoAdam,
# WarmupCosineLR, TensorBoard) shortened to 100 steps on ONE GPU. Same code path as a real run; only the batch is
# scaled down to one GPU's share of the paper's 512 (one micro-batch of 64 sequences, no accumulation), the
# schedule to 100 steps (10 warmup) and the data to the built-in demo corpus (no network needed).
#
#   bench/gpu_train.sh                       # after `make setup demo-data tokenizer` with a CUDA torch in .venv
#   PEAK_TFLOPS=989 bench/gpu_train.sh       # MFU against this peak (default: the detected GPU's, see telemetry.py)
#
# Prints: tokens/s and MFU (formula in ds_orthoadam/telemetry.py), the loss-scale history and the number of
# overflow-skipped steps; the run directory (TensorBoard logs, checkpoint, export) is kept under $RUN_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
RUN_DIR="${RUN_DIR:-runs/bench-gpu-train}"
STEPS=100
[[ -d data/demo && -d data/demo/tokenizer ]] || { echo "run 'make demo-data tokenizer' first" >&2; exit 2; }
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
rm -rf "$RUN_DIR"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
make --no-print-directory train-llama-60m NUM_GPUS=1 VENV="$VENV" ATTN=softmax1 OPT=orthoadam \
    TRAIN_DATA=data/demo TRAIN_TOKENIZER=data/demo/tokenizer RUN_DIR="$RUN_DIR" \
    TRAIN_ARGS="--train-steps $STEPS --set train_batch_size=64 --set scheduler.params.total_num_steps=$STEPS \
--set scheduler.params.warmup_num_steps=10 --log-every 5 --eval-every 0 --checkpoint-every $STEPS \
--outlier-every 50 --val-samples 33 ${PEAK_TFLOPS:+--peak-tflops $PEAK_TFLOPS}"

"$VENV/bin/python" - "$RUN_DIR/metrics.jsonl" <<'PY'
import json, statistics, sys

rows = [json.loads(line) for line in open(sys.argv[1])]
logged = [row for row in rows if "Perf/tokens_per_s" in row]
steady = logged[len(logged) // 2:] or logged  # second half: past start-up and warm-up of the kernels
print(f"\nsteps: {max(row['step'] for row in rows)}, logged every 5")
print(f"tokens/s (median of the second half): {statistics.median(r['Perf/tokens_per_s'] for r in steady):,.0f}")
mfu = (f"MFU: {100 * statistics.median(r['Perf/mfu'] for r in steady):.1f}%" if "Perf/mfu" in steady[0]
       else "MFU: not reported (unlisted GPU: set PEAK_TFLOPS)")
print(f"achieved TFLOP/s: {statistics.median(r['Perf/tflops'] for r in steady):.2f}, {mfu} "
      "(6N + 12LdT FLOPs per token)")
print("loss scale by step: " + ", ".join(f"{r['step']}:{r['Train/loss_scale']:.0f}" for r in logged))
print(f"overflow-skipped steps: {logged[-1]['Train/skipped_steps']:.0f}")
print(f"final train loss {logged[-1]['Train/loss']:.3f}; validation loss "
      f"{[r for r in rows if 'Val/loss' in r][-1]['Val/loss']:.3f}")
PY
echo "TensorBoard: $RUN_DIR/tensorboard"
