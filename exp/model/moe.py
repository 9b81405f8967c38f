"""Top-k mixture-of-experts SwiGLU MLP and its router statistics and losses.

Definitions, for N tokens, C experts, top-k routing and router logits z (N, C):

- ``P_i = mean_n softmax(z_n)_i``: mean router probability over all C experts (differentiable).
- ``f_i = count of (token, slot) assignments to expert i / (N * k)``: the share of the N * k top-k
  routing slots that expert i receives, so ``sum_i f_i = 1`` and a balanced router has ``f_i = 1/C``.
  With k = 1 this is Switch Transformer's fraction of tokens dispatched to expert i; for k > 1 it
  is the fraction of tokens whose top-k includes expert i, divided by k. Not differentiable.
- ``load_balance = C * sum_i f_i * P_i`` (Switch Transformer): 1.0 when routing is balanced
  (f and P uniform); gradients reach the router through P only.
- ``auxiliary = sum_i (f_i - 1/C)^2``: the value is exactly that. Since f has no gradient, f is
  replaced by the straight-through ``f + P - stopgrad(P)``, so the gradient is
  ``sum_i 2 (f_i - 1/C) dP_i``: the router is pushed away from over-used experts.
- ``z_loss = mean_n logsumexp(z_n)^2`` (ST-MoE): keeps router logits small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from exp.model.layers import SwiGLU


@dataclass(frozen=True)
class RouterStats:
    """Routing decisions and statistics of one forward over N tokens and C experts."""

    top_idx: torch.Tensor  # (N, k) int64, chosen experts, best first
    gates: torch.Tensor  # (N, k) fp32, softmax over the chosen logits
    f: torch.Tensor  # (C,) share of routing slots per expert, detached; also the logged expert usage
    P: torch.Tensor  # (C,) mean router probability
    load_balance: torch.Tensor  # 0-d
    auxiliary: torch.Tensor  # 0-d
    z_loss: torch.Tensor  # 0-d


def router_stats(logits: torch.Tensor, top_k: int) -> RouterStats:
    """Top-k routing of logits (N, C) with renormalised gates and the router losses (module docstring)."""
    logits = logits.float()
    C = logits.size(-1)
    top_logits, top_idx = logits.topk(top_k, dim=-1)  # (N, k)
    gates = top_logits.softmax(dim=-1)
    P = logits.softmax(dim=-1).mean(0)  # (C,)
    f = torch.bincount(top_idx.flatten(), minlength=C).to(P.dtype) / top_idx.numel()  # (C,), no grad
    f_st = f + P - P.detach()  # value of f, gradient of P
    return RouterStats(
        top_idx=top_idx,
        gates=gates,
        f=f,
        P=P,
        load_balance=C * (f * P).sum(),
        auxiliary=(f_st - 1.0 / C).pow(2).sum(),
        z_loss=torch.logsumexp(logits, dim=-1).pow(2).mean(),
    )


class MoEMLP(nn.Module):
    """num_experts SwiGLU experts behind a linear top-k router; output is the gate-weighted expert sum."""

    def __init__(self, d_model: int, hidden: int, num_experts: int, top_k: int = 2, dropout: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, hidden, dropout) for _ in range(num_experts))
        self.stats: RouterStats | None = None  # set by every forward, read by GPT.router_losses()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model); records self.stats for this call."""
        flat = x.reshape(-1, x.size(-1))  # (N, d_model)
        # Router in fp32 (ST-MoE): bf16 logits make top-k choices and the z-loss noisy.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())  # (N, C)
        self.stats = stats = router_stats(logits, self.top_k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(stats.top_idx == e)  # tokens routed to e, and which of their k slots
            y = expert(flat[tok]) * stats.gates[tok, slot, None].to(flat.dtype)
            out.index_add_(0, tok, y.to(out.dtype))
        return out.view_as(x)
