"""Models: GPT (gpt.py) built from the shared layers (layers.py) with a dense or mixture-of-experts MLP
(moe.py), any transformers causal LM (hf.py: model=hf), and the protocol any user nn.Module follows to train,
plan, export and generate (protocol.py).

`exp.model.GPT` is the name configs and saved checkpoints use (`_target_: exp.model.GPT`)."""

from exp.model.gpt import GPT, Block
from exp.model.hf import HFCausalLM
from exp.model.layers import Attention, RMSNorm, SwiGLU, apply_rope, rope_cache
from exp.model.moe import MoEMLP, RouterStats, router_stats

__all__ = [
    "GPT",
    "Attention",
    "Block",
    "HFCausalLM",
    "MoEMLP",
    "RMSNorm",
    "RouterStats",
    "SwiGLU",
    "apply_rope",
    "rope_cache",
    "router_stats",
]
