"""Throughput of the full analysis metric pass versus plain forward passes of the same model on the same batches.

    python bench/analysis.py [--model llama-60m] [--attention softmax1] [--batches 4] [--batch-size 8] [--seq-len 256]

Baselines, measured in the same run: (a) a plain forward that returns attention weights (eager attention,
``output_attentions=True``; target: metric pass <= 2x its time) and (b) a plain forward with the model's own
(fused) attention, for information. The metric pass computes every outlier statistic, perplexity and the plot maps.
"""
from __future__ import annotations

import argparse
import time

import torch

import ds_orthoadam  # noqa: F401  (registers softmax-1)
from ds_orthoadam.analysis.hooks import eager_attention, evaluation_mode
from ds_orthoadam.analysis.runner import metric_pass
from ds_orthoadam.models import MODEL_SPECS, build_model


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(function, device: torch.device, repeats: int) -> float:
    function()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _synchronise(device)
        start = time.perf_counter()
        function()
        _synchronise(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(MODEL_SPECS), default="llama-tiny")
    parser.add_argument("--attention", choices=("softmax", "softmax1"), default="softmax1")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, attention=args.attention, max_seq_len=args.seq_len)
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    vocab = model.config.vocab_size
    batches = [{"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), device=device)}
               for _ in range(args.batches)]
    tokens = args.batches * args.batch_size * args.seq_len

    def plain_forward(output_attentions: bool):
        def run():
            with evaluation_mode(model):
                for batch in batches:
                    model(**batch, use_cache=False, output_attentions=output_attentions)
        return run

    def forward_with_weights():
        with eager_attention(model):
            plain_forward(True)()

    def analysis():
        metric_pass(model, batches)

    timings = {
        "plain forward, fused attention": _best_time(plain_forward(False), device, args.repeats),
        "plain forward with attention weights": _best_time(forward_with_weights, device, args.repeats),
        "analysis metric pass": _best_time(analysis, device, args.repeats),
    }
    print(f"{args.model} ({args.attention}, {args.dtype}) on {device}: {args.batches} x {args.batch_size} x "
          f"{args.seq_len} = {tokens} tokens, best of {args.repeats}")
    for name, seconds in timings.items():
        print(f"  {name:40s} {tokens / seconds:12,.0f} tokens/s")
    weights = timings["analysis metric pass"] / timings["plain forward with attention weights"]
    fused = timings["analysis metric pass"] / timings["plain forward, fused attention"]
    print(f"ratio metric pass / forward with attention weights: {weights:.2f}x (target <= 2x: "
          f"{'met' if weights <= 2 else 'NOT met'})")
    print(f"ratio metric pass / forward with fused attention:   {fused:.2f}x (information)")


if __name__ == "__main__":
    main()
