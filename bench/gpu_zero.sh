#!/usr/bin/env bash
# GPU check of OrthoAdam inside DeepSpeed: 50 fp16 ZeRO-1 steps of llama-130m on one GPU with AdamW, then with
# OrthoAdam (same config but the optimiser name); prints tokens/s for both, their ratio and the overflow-skip counts.
# Run from the repository root with the venv active (torch with CUDA, `pip install -e .`):
#     bash bench/gpu_zero.sh [extra args for bench/zero_throughput.py, e.g. --micro-batch 32]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$(mktemp -d)"
port=$((29500 + RANDOM % 1000))
for optimizer in AdamW OrthoAdam; do
  deepspeed --num_gpus 1 --master_port "$port" bench/zero_throughput.py \
    --optimizer "$optimizer" --model llama-130m --steps 50 --precision fp16 "$@" 2>&1 | tee "$log/$optimizer.txt"
done
adamw=$(grep -o 'tokens_per_s=[0-9]*' "$log/AdamW.txt" | cut -d= -f2)
ortho=$(grep -o 'tokens_per_s=[0-9]*' "$log/OrthoAdam.txt" | cut -d= -f2)
echo "== summary (ZeRO-1, 1 GPU; tokens/s measured after 5 warm-up steps) =="
grep -h '^RESULT' "$log/AdamW.txt" "$log/OrthoAdam.txt"
python -c "print(f'OrthoAdam/AdamW tokens/s ratio: {$ortho / $adamw:.3f}')"
