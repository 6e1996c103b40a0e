#!/usr/bin/env bash
# Train one model on one node with the deepspeed launcher (default: 8 GPUs).
#
#   launch/train_single_node.sh MODEL [ds-orthoadam-train options...]
#   NUM_GPUS=8 MASTER_PORT=29500 launch/train_single_node.sh llama-130m --attention softmax1 --optimizer orthoadam \
#       --data c4 --tokenizer data/tokenizer --output-dir runs/llama-130m
#
# Environment: NUM_GPUS (8), MASTER_PORT (29500; give concurrent runs distinct ports), VENV (the repository's .venv:
# its deepspeed is used when present, else the one on PATH), STOP_GRACE (seconds to wait for the ranks to save after
# SIGINT/SIGTERM before killing them; default 0: no limit; launch/supervise.sh, docs/cluster.md).
# Runs in the current directory: relative paths (--data, --tokenizer, --output-dir, ...) mean what they mean here.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's ds_orthoadam, from any directory
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 MODEL [ds-orthoadam-train options...]   (e.g. $0 llama-60m --data c4 ...)" >&2
    exit 2
fi
model="$1"; shift
venv="${VENV:-$repo/.venv}"
launcher="deepspeed" python="python3"
[[ -x "$venv/bin/deepspeed" ]] && launcher="$venv/bin/deepspeed" python="$venv/bin/python"
# What every rank would find alike (arguments, config, --output-dir, tokenizer, data) is checked once, here, before
# any rank starts: a bad input is one error line, not NUM_GPUS processes started to report it.
WORLD_SIZE="${NUM_GPUS:-8}" "$python" -m ds_orthoadam.train --check-only --model "$model" "$@"
source "$repo/launch/supervise.sh"  # SIGINT/SIGTERM reach the ranks, which save a checkpoint and exit 130
run_supervised "$launcher" --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}" \
    --module ds_orthoadam.train --model "$model" "$@"
