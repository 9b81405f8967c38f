"""Generation with a key/value cache against the loop without one, measured in the same process.

    python bench/bench_generate.py [--new 256] [--rounds 3]

New tokens per second generating --new tokens greedily from an 8-token prompt, batch 1, for gpt_tiny and
gpt_small (random weights: speed does not depend on them): exp.model.GPT.generate (the prompt once, then one token
a step over the cache) against exp.model.protocol.sample without a step function (each token a forward over the
last seq_len tokens: what exp did before the cache). The two alternate round by round; medians. Target: >= 5x on
CPU at 256 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from exp.model import GPT
from exp.model.protocol import sample
from exp.paths import CONF_DIR


def build(name: str) -> GPT:
    shape = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    kw = {k: shape[k] for k in ("seq_len", "n_layer", "n_head", "d_model", "mlp_hidden") if k in shape}
    torch.manual_seed(0)
    return GPT(vocab_size=264 if name == "gpt_tiny" else 50304, **kw).eval()


def rate(model: GPT, prompt: torch.Tensor, new: int, cached: bool) -> float:
    """New tokens per second of one greedy generation, with the cache or with the loop without one."""
    started = time.perf_counter()
    with torch.no_grad():
        if cached:
            model.generate(prompt, new, temperature=0)
        else:
            sample(model, prompt, new, temperature=0, seq_len=model.seq_len)
    return new / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for name in ("gpt_tiny", "gpt_small"):
        model = build(name)
        prompt = torch.randint(0, 256, (1, 8))
        cached, loop = [], []
        for _ in range(args.rounds):
            cached.append(rate(model, prompt, args.new, cached=True))
            loop.append(rate(model, prompt, args.new, cached=False))
        c, u = statistics.median(cached), statistics.median(loop)
        print(f"{name} (seq_len {model.seq_len}), {args.new} new tokens, batch 1, {torch.get_num_threads()} threads:")
        print(f"  key/value cache {c:,.1f} tokens/s, without {u:,.1f} tokens/s: {c / u:.1f}x")


if __name__ == "__main__":
    main()
