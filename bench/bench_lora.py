"""LoRA against full fine-tuning of gpt_small on CPU: step time and peak memory as ratios, measured in one run.

    python bench/bench_lora.py [--steps 5] [--rounds 2] [--seq 128] [--batch 4] [--r 8]

gpt_small's shape (12 layers, 12 heads, d_model 768; vocab 264, the byte tokenizer's) with SFT-like batches (the
first half of each row's labels masked), AdamW, float32, gradient clipping at 1.0, as exp's loop steps. LoRA goes
where `+model/adapter=lora` puts it (exp.model.adapters: qkv, proj, gate, up, down of every block) through
peft; full fine-tuning trains every parameter. Each measurement runs in a child process of its own, full and LoRA
alternating over the rounds, so that each child's peak resident memory (ru_maxrss) is its own; both children import
peft, so that the baseline is the same. Reported per mode: the median step (after two warm-up steps) over the rounds,
the peak RSS, and the bytes of weights + gradients + optimizer state counted from the tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def child(mode: str, steps: int, seq: int, batch: int, r: int) -> dict:
    import peft  # noqa: F401  (in both modes: the same imports, the same baseline memory)
    import torch

    from exp.model import GPT, adapters
    from exp.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(vocab_size=264, seq_len=1024, n_layer=12, n_head=12, d_model=768, mlp_hidden=2048)
    if mode == "lora":
        adapters.inject(model, adapters.AdapterConfig(r=r, alpha=2 * r))
    make = lambda groups, **kw: torch.optim.AdamW(groups, lr=1e-4, **kw)  # noqa: E731
    optimizer = build_optimizer(make, model, torch.device("cpu"), weight_decay=0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(264, (batch, seq), generator=g)
    y = torch.randint(264, (batch, seq), generator=g)
    y[:, : seq // 2] = -100  # the prompt's half: no loss, as SFT's masks
    times = []
    for i in range(steps + 2):
        started = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients kept, as counted below
        if i >= 2:
            times.append(time.perf_counter() - started)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.ndim)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    return {
        "step_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "state_mb": (weights + grads + state) / 2**20,
        "trainable": sum(p.numel() for p in trainable),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--child", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.seq, args.batch, args.r)))
        return
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.rounds):
        for mode in runs:
            cmd = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    print(f"gpt_small, batch {args.batch} x seq {args.seq}, AdamW fp32, {args.steps} steps x {args.rounds} rounds")
    for mode, m in med.items():
        print(
            f"  {mode:4}  step {m['step_s'] * 1000:8.0f} ms | peak RSS {m['peak_rss_mb']:7.0f} MB | weights+grads+"
            f"optimizer {m['state_mb']:6.0f} MB | trainable {m['trainable']:,.0f} of {m['params']:,.0f}"
        )
    f, lo = med["full"], med["lora"]
    print(
        f"  LoRA r={args.r} / full: step time {lo['step_s'] / f['step_s']:.2f}, peak RSS "
        f"{lo['peak_rss_mb'] / f['peak_rss_mb']:.2f}, weights+grads+optimizer {lo['state_mb'] / f['state_mb']:.2f}"
    )


if __name__ == "__main__":
    main()
