#!/usr/bin/env bash
# Train one model on several nodes with the deepspeed launcher: from one node over pdsh/ssh to every host of the
# hostfile, or started on every node with NODE_RANK set (per-node mode, no ssh; see below and launch/slurm.sbatch).
#
#   HOSTFILE=launch/hostfile MASTER_ADDR=node1 launch/train_multi_node.sh MODEL [ds-orthoadam-train options...]
#
# Requirements: passwordless ssh from this node to every host (not in per-node mode); the repository and its .venv at the same path on
# every node; --output-dir on a filesystem all nodes share (checkpoints are written by every rank). Every rank runs
# in the directory the script is started from (it must exist on every node), so relative paths mean what they mean
# there.
# The hostfile lists "HOST slots=8" per node (launch/hostfile.example). MASTER_ADDR is the address of the first host
# as the other nodes reach it; MASTER_PORT defaults to 29500. DS_LAUNCHER_ARGS holds further deepspeed launcher
# options (e.g. "--ssh_port 2222" or "--launcher openmpi"), placed before the training module.
#
# STOP_GRACE: seconds to wait for this node's ranks to save after SIGINT/SIGTERM (launch/supervise.sh, docs/cluster.md).
#
# Environment propagation: DeepSpeed exports PYTHON*, NCCL* and a few other variables to the remote ranks by itself;
# everything else must be listed in a .deepspeed_env file (KEY=VALUE lines). This script writes the repository's
# .deepspeed_env (and points DS_ENV_FILE at it) from the current values of the variables named in DS_ENV_VARS
# (default below), so that the remote ranks see the same Hugging Face cache/offline settings and PATH as this shell.
# Add your own, e.g. DS_ENV_VARS="$DEFAULT_DS_ENV_VARS NCCL_SOCKET_IFNAME".
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's ds_orthoadam (DeepSpeed exports PYTHON*)
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: HOSTFILE=FILE MASTER_ADDR=HOST $0 MODEL [ds-orthoadam-train options...]" >&2
    exit 2
fi
: "${HOSTFILE:?set HOSTFILE to a deepspeed hostfile (lines 'HOST slots=8'; see launch/hostfile.example)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first host in $HOSTFILE}"
[[ -f "$HOSTFILE" ]] || { echo "hostfile $HOSTFILE does not exist" >&2; exit 2; }
model="$1"; shift

# NODE_RANK=k (0-based, the node's line in the hostfile): per-node mode, how SLURM (launch/slurm.sbatch) and
# Kubernetes start jobs: the script runs on every node with the same hostfile and MASTER_ADDR, and each starts only
# its own ranks (DeepSpeed's --no_ssh --node_rank k), so no ssh is needed and a stop signal reaches every node's ranks.
per_node=()
if [[ -n "${NODE_RANK:-}" ]]; then
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || { echo "NODE_RANK must be this node's 0-based line in $HOSTFILE, got '$NODE_RANK'" >&2; exit 2; }
    per_node=(--no_ssh --node_rank "$NODE_RANK")
fi

DEFAULT_DS_ENV_VARS="PATH HF_HOME HF_DATASETS_CACHE HF_HUB_OFFLINE HF_DATASETS_OFFLINE TOKENIZERS_PARALLELISM OMP_NUM_THREADS"
if [[ ${#per_node[@]} -eq 0 ]]; then  # per-node mode: every node's ranks start from its own environment
    export DS_ENV_FILE="$repo/.deepspeed_env"  # the launcher reads this (absolute) path
    : > "$DS_ENV_FILE"
    for name in ${DS_ENV_VARS:-$DEFAULT_DS_ENV_VARS}; do
        if [[ -n "${!name:-}" ]]; then
            echo "$name=${!name}" >> "$DS_ENV_FILE"
        fi
    done
    echo "propagating to all nodes via $DS_ENV_FILE: $(cut -d= -f1 "$DS_ENV_FILE" | tr '\n' ' ')" >&2
fi

venv="${VENV:-$repo/.venv}"
[[ "$venv" == /* ]] || venv="$PWD/$venv"  # remote nodes run the launcher by this path: make it absolute
launcher="deepspeed" python="python3"
[[ -x "$venv/bin/deepspeed" ]] && launcher="$venv/bin/deepspeed" python="$venv/bin/python"
# What every rank would find alike (arguments, config, --output-dir, tokenizer, data) is checked once, here, before
# any node is contacted, for the world of all the hostfile's slots; skipped where DS_LAUNCHER_ARGS picks fewer.
slots=$(awk '!/^[[:space:]]*(#|$)/ { for (i = 1; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) n += substr($i, 7) }
             END { print n + 0 }' "$HOSTFILE")
if [[ "$slots" -gt 0 && ! " ${DS_LAUNCHER_ARGS:-} " =~ \ --(include|exclude|num_nodes|num_gpus|num_accelerators) ]]; then
    WORLD_SIZE="$slots" "$python" -m ds_orthoadam.train --check-only --model "$model" "$@"
fi
source "$repo/launch/supervise.sh"  # SIGINT/SIGTERM reach this node's ranks, which save a checkpoint and exit 130
# DS_LAUNCHER_ARGS is unquoted on purpose: it holds several options.
run_supervised "$launcher" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    "${per_node[@]}" ${DS_LAUNCHER_ARGS:-} \
    --module ds_orthoadam.train --model "$model" "$@"
