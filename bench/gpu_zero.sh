#!/usr/bin/env bash
# GPU check of OrthoAdam inside DeepSpeed: 50 fp16 ZeRO-1 steps of llama-130m on one GPU with AdamW, then with
# OrthoAdam (Hadamard rotations, the training configs' choice, then dense; same config but the optimiser); prints
# tokens/s of each, their ratios to AdamW and the overflow-skip counts. (bench/rotation_cost.py estimates the same
# overheads from arithmetic.)
# Run from the repository root with the venv active (torch with CUDA, `pip install -e .`):
#     bash bench/gpu_zero.sh [extra args for bench/zero_throughput.py, e.g. --micro-batch 32]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$(mktemp -d)"
port=$((29500 + RANDOM % 1000))
runs=("AdamW hadamard" "OrthoAdam hadamard" "OrthoAdam dense")
for run in "${runs[@]}"; do
  read -r optimizer rotation <<< "$run"
  deepspeed --num_gpus 1 --master_port "$port" bench/zero_throughput.py --optimizer "$optimizer" \
    --rotation "$rotation" --model llama-130m --steps 50 --precision fp16 "$@" 2>&1 | tee "$log/$optimizer-$rotation.txt"
done
echo "== summary (ZeRO-1, 1 GPU; tokens/s measured after 5 warm-up steps) =="
grep -h '^RESULT' "$log"/*.txt
python - "$log" <<'PY'
import pathlib, re, sys

rates = {}
for path in pathlib.Path(sys.argv[1]).glob("*.txt"):
    match = re.search(r"^RESULT optimizer=(\S+) .*tokens_per_s=(\d+)", path.read_text(), re.M)
    if match:
        rates[match[1]] = float(match[2])
for name, rate in sorted(rates.items()):
    if name != "AdamW" and "AdamW" in rates:
        print(f"{name}/AdamW tokens/s ratio: {rate / rates['AdamW']:.3f} (OrthoAdam's extra time per step: "
              f"{rates['AdamW'] / rate - 1:+.1%})")
PY
