#!/usr/bin/env bash
# Every GPU check of the project in one go (about 6-8 minutes on one modern GPU), each logged to LOG_DIR/<check>.log:
#
#   1. softmax1_kernels: the fused CUDA softmax-1 kernels (flash, memory-efficient) against the eager reference,
#      forward and backward, fp16/bf16/fp32, head dims 64/128: max errors and which kernel the self-check kept;
#   2. attention: bench/attention.py --device cuda (time and memory versus causal SDPA softmax);
#   3. gpu_zero: bench/gpu_zero.sh (50 fp16 ZeRO-1 steps of llama-130m, AdamW vs OrthoAdam, overflow skips);
#   4. gpu_train: bench/gpu_train.sh (100 fp16 steps of the real trainer, llama-60m, softmax-1 + OrthoAdam).
#
#   bash bench/gpu_checks.sh [LOG_DIR]     # after `make setup demo-data tokenizer` with a CUDA torch in $VENV
#
# A failing check does not stop the others; the exit status is the number of failed checks. CHECKS="1 2" runs a
# subset; CHECK_TIMEOUT (seconds, default 300) bounds each check.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
LOG_DIR="${1:-$(mktemp -d)}"
CHECKS="${CHECKS:-1 2 3 4}"
CHECK_TIMEOUT="${CHECK_TIMEOUT:-300}"
mkdir -p "$LOG_DIR"
[[ "$VENV" = /* ]] || VENV="$PWD/$VENV"
export VENV PATH="$VENV/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

softmax1_kernels() {
  python -W always - <<'PY'
import itertools

import torch

from ds_orthoadam import fused_softmax1
from ds_orthoadam.attention import softmax1_eager_attention, softmax1_sdpa_attention


class Module(torch.nn.Module):
    num_key_value_groups = 1


print(torch.cuda.get_device_name(), "torch", torch.__version__)
for dtype, head_dim, length in itertools.product((torch.float16, torch.bfloat16, torch.float32), (64, 128), (256, 1024)):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 4, length, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(2, length, 4, head_dim, generator=gen, device="cuda", dtype=dtype)
    fused, _ = softmax1_sdpa_attention(Module(), q, k, v, None, scaling=head_dim**-0.5)
    fused_grads = torch.autograd.grad(fused, (q, k, v), grad)
    # Reference in float64 from the same inputs, with the explicit causal mask the eager path needs.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None, None]
    expected, _ = softmax1_eager_attention(Module(), q64, k64, v64, mask, scaling=head_dim**-0.5)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad.double())
    errors = [(a.double() - b).abs().max().item() for a, b in [(fused, expected), *zip(fused_grads, expected_grads)]]
    kernel = fused_softmax1._select_kernel(q)
    kept = fused_softmax1._VERIFIED.get(("cuda", dtype, head_dim, kernel.name))
    print(f"{str(dtype):15s} D={head_dim:<4d} T={length:<5d} kernel {kernel.name:15s} kept={kept!s:5s} "
          f"max|err| out {errors[0]:.2e} dq {errors[1]:.2e} dk {errors[2]:.2e} dv {errors[3]:.2e}")
PY
}

attention() { python bench/attention.py --device cuda; }
gpu_zero() { bash bench/gpu_zero.sh; }
gpu_train() { bash bench/gpu_train.sh; }

failed=0
names=(softmax1_kernels attention gpu_zero gpu_train)
for index in $CHECKS; do
  name="${names[$((index - 1))]}"
  echo "== $name (log: $LOG_DIR/$name.log)"
  start=$SECONDS
  if timeout "$CHECK_TIMEOUT" bash -c "$(declare -f "$name"); $name" > "$LOG_DIR/$name.log" 2>&1; then
    status=ok
  else
    status="FAILED (exit $?)"
    failed=$((failed + 1))
  fi
  echo "== $name: $status in $((SECONDS - start)) s"
  tail -n 25 "$LOG_DIR/$name.log"
done
exit "$failed"
