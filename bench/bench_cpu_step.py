"""exp's GPT against a GPT-2-style model of the same width, one training step each, interleaved in one process.

    python bench/bench_cpu_step.py [--steps 60] [--rounds 5] [--compile]

Both models: 4 layers, 4 heads, d_model 128, seq 64, batch 12, vocab 264, AdamW, float32. The reference is nanoGPT's
block (LayerNorm, a 4x GELU MLP, learned positions, the same fused scaled_dot_product_attention, tied embeddings);
exp.model.GPT keeps its architecture (RMSNorm, SwiGLU at 8/3 x, rotary positions), which learns far more per step.
Steps alternate between the two so that both see the same machine state; each round's median step, then the median
of the rounds. Target: exp / reference <= 1.0. With --compile, both are torch.compile'd and the compile time (the
first step) is reported beside the steady step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from exp.model import GPT

VOCAB, SEQ, BATCH, LAYERS, HEADS, WIDTH = 264, 64, 12, 4, 4, 128


class Gpt2Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class Gpt2(nn.Module):
    """nanoGPT's model at this width: the reference."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(SEQ, WIDTH)
        self.blocks = nn.ModuleList(Gpt2Block(WIDTH, HEADS) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def step(model, optimizer, x, y) -> float:
    started = time.perf_counter()
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    models = {"exp GPT": GPT(VOCAB, SEQ, LAYERS, HEADS, WIDTH), "GPT-2 style (reference)": Gpt2()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    if args.compile:
        models = {name: torch.compile(m) for name, m in models.items()}
    x = torch.randint(0, 256, (BATCH, SEQ))
    y = torch.randint(0, 256, (BATCH, SEQ))
    first = {name: step(m, optims[name], x, y) for name, m in models.items()}  # compile / warm-up
    for _ in range(3):
        for name, m in models.items():
            step(m, optims[name], x, y)
    rounds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.steps):
            for name, m in models.items():
                times[name].append(step(m, optims[name], x, y))
        for name in models:
            rounds[name].append(statistics.median(times[name]))
    med = {name: statistics.median(r) for name, r in rounds.items()}
    print(f"one training step, batch {BATCH} x {SEQ}, {torch.get_num_threads()} threads, compile={args.compile}:")
    for name, t in med.items():
        extra = f" (first step {first[name]:.1f} s)" if args.compile else ""
        print(f"  {name:26s} {1000 * t:7.2f} ms{extra}")
    print(f"  exp / reference: {med['exp GPT'] / med['GPT-2 style (reference)']:.3f}")


if __name__ == "__main__":
    main()
