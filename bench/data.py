"""Is data ever the bottleneck? Tokens/s of the data pipeline vs tokens/s that llama-60m training consumes.

Both are measured in this process on this machine's CPU, one thread each:

* data: TrainStream over the demo corpus (read json.gz via HF datasets, tokenise, pack, collate) at the paper's
  sequence length 256, one full epoch;
* trainer: forward + backward of llama-60m (``build_model("llama-60m")``: hidden 512, intermediate 1376, 8 heads,
  8 layers, vocab 32000, softmax-1) on a small micro-batch. Tokens/s per process hardly depend on the batch, so the paper's batch of 512 x 256 tokens
  takes (512 * 256) / (trainer tokens/s) seconds per step on this CPU, and data preparation for it takes
  (512 * 256) / (data tokens/s).

Prints the ratio (target >= 20x). For context it also prints what one V100 rank would consume under a stated
throughput assumption (the rate one data process per rank must sustain on a GPU node), and the stream's rate from
pre-tokenised shards of the same data.

Run: ``make demo-data tokenizer && python bench/data.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from ds_orthoadam.data import TrainStream, load_tokenizer, resolve_source  # noqa: E402
from ds_orthoadam.data.pretokenize import pretokenize  # noqa: E402
from ds_orthoadam.models import build_model  # noqa: E402

SEQ_LEN = 256
PAPER_BATCH = 512
TARGET_RATIO = 20.0
V100_FLOPS = 125e12 * 0.3  # fp16 tensor-core peak x an assumed 30% utilisation


def data_tokens_per_second(data: str, tokenizer_path: str, micro_batch: int) -> tuple[float, int]:
    """Tokens/s of the training stream over one epoch of ``data`` (including opening shards)."""
    tokenizer = load_tokenizer(tokenizer_path)
    stream = TrainStream(data, tokenizer, SEQ_LEN, micro_batch)
    tokens, start = 0, time.perf_counter()
    for batch in stream:
        tokens += batch["input_ids"].numel()
        if stream.state_dict()["positions"]["0"]["cursor"][0] > 0:  # one epoch done
            break
    return tokens / (time.perf_counter() - start), tokens


def trainer_tokens_per_second(micro_batch: int, steps: int) -> tuple[float, int]:
    """Tokens/s of forward + backward of llama-60m on this CPU (after one warm-up step)."""
    torch.manual_seed(0)
    model = build_model("llama-60m", max_seq_len=SEQ_LEN).train()  # softmax-1, vocabulary 32000
    ids = torch.randint(3, 32000, (micro_batch, SEQ_LEN))
    model(input_ids=ids, labels=ids).loss.backward()
    start = time.perf_counter()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
    parameters = sum(p.numel() for p in model.parameters())
    return steps * ids.numel() / (time.perf_counter() - start), parameters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--tokenizer", default="data/demo/tokenizer")
    parser.add_argument("--micro-batch", type=int, default=2, help="llama-60m micro-batch for the CPU measurement")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_rate, data_tokens = data_tokens_per_second(args.data, args.tokenizer, micro_batch=16)
    model_rate, parameters = trainer_tokens_per_second(args.micro_batch, args.steps)
    step_tokens = PAPER_BATCH * SEQ_LEN
    ratio = data_rate / model_rate
    print(f"data pipeline : {data_rate:12,.0f} tokens/s  ({data_tokens:,} tokens, one epoch of {args.data})")
    print(f"llama-60m fwd+bwd on this CPU: {model_rate:8,.0f} tokens/s  ({parameters / 1e6:.1f}M parameters, "
          f"micro-batch {args.micro_batch}x{SEQ_LEN})")
    print(f"paper batch {PAPER_BATCH}x{SEQ_LEN}: data {step_tokens / data_rate:8.2f} s/step vs training "
          f"{step_tokens / model_rate:8.1f} s/step on this CPU")
    print(f"ratio data / trainer = {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x): "
          f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    v100_rate = V100_FLOPS / (6 * parameters)
    print(f"context: one V100 rank at 30% of fp16 peak would consume ~{v100_rate:,.0f} tokens/s "
          f"-> ratio {data_rate / v100_rate:.1f}x per data process (use TrainStream(num_workers=...) or pre-tokenise)")
    with tempfile.TemporaryDirectory() as shards:
        pretokenize(resolve_source(args.data, "train"), args.tokenizer, os.path.join(shards, "train"))
        token_rate, _ = data_tokens_per_second(shards, args.tokenizer, micro_batch=16)
    print(f"context: pre-tokenised shards of the same data stream at {token_rate:,.0f} tokens/s "
          f"-> ratio {token_rate / v100_rate:.1f}x per V100 rank")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
