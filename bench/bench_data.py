"""Mixtures and document masks at no visible cost, each against a reference measured in the same run.

    python bench/bench_data.py [--steps 30] [--docs 4]

1. The sampler's time per step: data=mixture (two sources, permutation order) and data.order=permutation against
   today's random windows, each as a share of one gpt_tiny training step (batch 16 x 128, forward, backward and
   AdamW) on this machine (target: a mixture draw <= 1% of the step).
2. A gpt_tiny training step with the document mask (rows of --docs documents: SDPA with a block-diagonal mask on
   CPU, FlexAttention's block mask on CUDA) against plain causal attention at the same shape (reported, no target:
   the mask trades a fused causal kernel for a masked one; on a GPU FlexAttention skips the masked blocks).
Steps alternate between the two kinds so that both see the same machine state; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from exp.data.batches import PermutationSampler, WindowSampler
from exp.data.mixture import MixtureSampler
from exp.model import GPT
from exp.model.layers import document_ids

SEQ, BATCH, EOT = 128, 16, 256


def tiny(device) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(vocab_size=264, seq_len=SEQ, n_layer=4, n_head=4, d_model=128).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model, optimizer, x, y, doc_ids=None) -> float:
    started = time.perf_counter()
    _, loss = model(x, y, doc_ids=doc_ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def draw_time(sampler, n: int) -> float:
    """Median seconds of one draw."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        next(sampler)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--docs", type=int, default=4, help="documents per row for the masked step")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    code = rng.integers(0, 256, 20_000_000).astype(np.uint16)  # 20M tokens: a real corpus's memmap-sized array
    prose = rng.integers(0, 256, 5_000_000).astype(np.uint16)

    model, optimizer = tiny(device)
    x = torch.randint(0, 256, (BATCH, SEQ), device=device)
    for _ in range(3):
        train_step(model, optimizer, x, x)
    step = statistics.median(train_step(model, optimizer, x, x) for _ in range(args.steps))

    samplers = {
        "random windows (reference)": WindowSampler(code, SEQ, BATCH, seed=0),
        "permutation": PermutationSampler(code, SEQ, BATCH, seed=0),
        "mixture, 2 sources": MixtureSampler(
            {"code": code, "prose": prose}, [(0, {"code": 0.3, "prose": 0.7})], SEQ, "permutation", BATCH, seed=0
        ),
    }
    draws = {name: draw_time(s, 20 * args.steps) for name, s in samplers.items()}
    ref = draws["random windows (reference)"]
    print(f"1. sampler per step ({device}, batch {BATCH} x {SEQ}); gpt_tiny training step {1000 * step:.2f} ms")
    for name, t in draws.items():
        print(f"  {name:28s} {1e6 * t:8.1f} us  {t / ref:5.2f}x the reference  {100 * t / step:5.2f}% of a step")

    # rows of --docs documents each: end-of-text tokens at random places
    doc_rows = torch.randint(0, 256, (BATCH, SEQ), device=device)
    for row in doc_rows:
        row[torch.randperm(SEQ - 1, device=device)[: args.docs - 1]] = EOT
    doc_ids = document_ids(doc_rows, EOT)
    masked, plain = [], []
    for _ in range(3):
        train_step(model, optimizer, doc_rows, doc_rows, doc_ids)
    for _ in range(args.steps):
        masked.append(train_step(model, optimizer, doc_rows, doc_rows, doc_ids))
        plain.append(train_step(model, optimizer, doc_rows, doc_rows))
    m, p = statistics.median(masked), statistics.median(plain)
    kind = "FlexAttention block mask" if device.type == "cuda" else "SDPA block-diagonal mask"
    print(f"2. document mask ({kind}, {args.docs} documents a row) against plain causal, gpt_tiny step:")
    print(f"  masked {1000 * m:.2f} ms, causal {1000 * p:.2f} ms: {m / p:.2f}x")


if __name__ == "__main__":
    main()
