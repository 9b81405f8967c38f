"""A DPO step against an SFT step on the same rows, interleaved in one process.

    python bench/bench_dpo.py [--steps 30] [--rounds 5] [--pairs 8]

Rows: --pairs pairs of the built-in preference set (data=preference_pystdlib, seq_len 128), i.e. 2 x pairs rows,
chosen then rejected. Model: gpt_tiny (4 layers, d_model 128), AdamW, float32, on this machine's CPU threads.
- SFT: stage=sft's step (forward, cross-entropy on the response tokens, backward, optimizer step) on all 2 x pairs rows;
- DPO: stage=dpo's step on the same rows as pairs: the policy's forward and backward, plus the frozen reference's
  forward under no_grad. Target: DPO / SFT <= 2.2x. Also printed: against SFT on the chosen rows alone (what an SFT
  stage trains per pair), for which a DPO step does the policy's work twice plus the reference's.
Steps alternate so that both see the same machine state; each round's median step, then the median of the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

from exp.data.preference import PreferencePyStdlib
from exp.model import GPT
from exp.stages import DPO, SFT

MODEL = dict(vocab_size=320, seq_len=128, n_layer=4, n_head=4, d_model=128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=8)
    args = ap.parse_args()
    cache = os.environ.get("EXP_CACHE_DIR", "~/.cache/exp")
    data = PreferencePyStdlib(seq_len=MODEL["seq_len"], cache_dir=cache)
    x, y = next(data.train_sampler(args.pairs, seed=0))
    torch.manual_seed(0)
    reference = GPT(**MODEL).eval()
    with tempfile.TemporaryDirectory() as tmp:  # DPO.__post_init__ wants its reference to exist; setup is bypassed
        dpo = DPO(name="dpo", num_steps=1, batch_size_per_gpu=args.pairs, learning_rate=1e-4, init_from=tmp)
    for p in reference.parameters():
        p.requires_grad_(False)
    dpo._reference = reference
    sft = SFT(name="sft", num_steps=1, batch_size_per_gpu=2 * args.pairs, learning_rate=1e-4)
    models = {}
    for name in ("sft", "sft_chosen", "dpo"):
        model = GPT(**MODEL)
        model.load_state_dict(reference.state_dict())
        models[name] = SimpleNamespace(model=model, opt=torch.optim.AdamW(model.parameters(), lr=1e-4))
    batches = {"sft": (x, y), "sft_chosen": (x[: args.pairs], y[: args.pairs]), "dpo": (x, y)}
    stages = {"sft": sft, "sft_chosen": sft, "dpo": dpo}

    def step(name: str) -> float:
        m = models[name]
        started = time.perf_counter()
        out = stages[name].train_step(m.model, batches[name], diagnostics=False)
        out["loss"].backward()
        m.opt.step()
        m.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for _ in range(3):  # warm-up
        for name in models:
            step(name)
    rounds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.steps):
            for name in models:
                times[name].append(step(name))
        for name in models:
            rounds[name].append(statistics.median(times[name]))
    ms = {name: 1000 * statistics.median(r) for name, r in rounds.items()}
    print(f"{args.pairs} pairs = {x.shape[0]} rows of {x.shape[1]} tokens, {torch.get_num_threads()} threads")
    print(f"SFT step, the same {x.shape[0]} rows:      {ms['sft']:8.1f} ms")
    print(f"SFT step, the {args.pairs} chosen rows only: {ms['sft_chosen']:8.1f} ms")
    print(f"DPO step ({args.pairs} pairs):             {ms['dpo']:8.1f} ms")
    ratio = ms["dpo"] / ms["sft"]
    print(f"DPO / SFT on the same rows: {ratio:.2f}x (target <= 2.2x: {'met' if ratio <= 2.2 else 'missed'})")
    print(f"DPO / SFT on the chosen rows: {ms['dpo'] / ms['sft_chosen']:.2f}x")


if __name__ == "__main__":
    main()
