"""Decoder-only GPT: RMSNorm pre-norm, rotary attention with optional GQA, SwiGLU MLP."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned 1-D scale."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        # Statistics in fp32 so bf16/fp16 activations do not lose precision in the mean of squares.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return cos, sin tables of shape (seq_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position using the half-split (GPT-NeoX) pairing; cos/sin are (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped-query key/value heads."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, dropout: float):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = d_model // n_head
        # Fused projection; rows are [q: n_head heads | k: n_kv_head heads | v: n_kv_head heads].
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model)."""
        B, T, C = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if nkv != nh:
            # Query head h reads key/value head h // (nh // nkv).
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class SwiGLU(nn.Module):
    """Gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model)."""
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model, n_head, n_kv_head, mlp_hidden, dropout, norm_eps, num_experts=0, top_k=2):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_head, n_kv_head, dropout)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        if num_experts:
            from exp.moe import MoEMLP  # here, not at the top: exp.moe imports SwiGLU from this module

            self.mlp = MoEMLP(d_model, mlp_hidden, num_experts, top_k, dropout)
        else:
            self.mlp = SwiGLU(d_model, mlp_hidden, dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model)."""
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only transformer language model."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_layer: int,
        n_head: int,
        d_model: int,
        n_kv_head: int | None = None,
        mlp_hidden: int | None = None,
        dropout: float = 0.0,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        tie_embeddings: bool = True,
        activation_checkpointing: bool = False,
        init_std: float = 0.02,
        num_experts: int = 0,
        top_k: int = 2,
        load_balance_coef: float = 0.01,
        auxiliary_coef: float = 0.0,
        z_loss_coef: float = 0.001,
    ):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if mlp_hidden is None:
            # 8/3 * d_model keeps SwiGLU's three matrices at the parameter cost of a 4x GELU MLP.
            mlp_hidden = 64 * math.ceil(8 * d_model / (3 * 64))
        sizes = dict(
            vocab_size=vocab_size,
            seq_len=seq_len,
            n_layer=n_layer,
            n_head=n_head,
            d_model=d_model,
            n_kv_head=n_kv_head,
            mlp_hidden=mlp_hidden,
        )
        for name, value in sizes.items():
            if value <= 0:
                raise ValueError(f"{name}={value} must be positive")
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}")
        if (d_model // n_head) % 2:
            raise ValueError(f"head_dim=d_model/n_head={d_model // n_head} must be even for RoPE")
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} must be divisible by n_kv_head={n_kv_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        if rope_theta <= 0 or norm_eps <= 0 or init_std <= 0:
            raise ValueError(f"rope_theta={rope_theta}, norm_eps={norm_eps}, init_std={init_std} must be positive")
        if num_experts < 0:
            raise ValueError(f"num_experts={num_experts} must be >= 0 (0 = dense MLP)")
        if num_experts and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        coefs = dict(load_balance_coef=load_balance_coef, auxiliary_coef=auxiliary_coef, z_loss_coef=z_loss_coef)
        for name, value in coefs.items():
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")

        self.vocab_size, self.seq_len, self.n_layer = vocab_size, seq_len, n_layer
        self.n_head, self.n_kv_head, self.d_model = n_head, n_kv_head, d_model
        self.mlp_hidden = mlp_hidden
        self.tie_embeddings = tie_embeddings
        self.activation_checkpointing = activation_checkpointing
        self.num_experts, self.top_k, self.router_coefs = num_experts, top_k, coefs

        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, n_kv_head, mlp_hidden, dropout, norm_eps, num_experts, top_k) for _ in range(n_layer)
        )
        self.norm = RMSNorm(d_model, norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

        # Non-persistent: rebuilt from the config, so kept out of checkpoints but still moved by .to().
        cos, sin = rope_cache(seq_len, d_model // n_head, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        # GPT-2: residual-branch output projections shrink with depth so the residual stream variance
        # stays roughly constant across 2 * n_layer additions.
        resid_std = std / math.sqrt(2 * self.n_layer)
        for name, p in self.named_parameters():
            if p.ndim < 2:
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "down.weight")):  # down.weight: dense or expert MLP
                nn.init.normal_(p, mean=0.0, std=resid_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (B, T) int64 -> logits (B, T, vocab), mean CE over targets != -100 (or None)."""
        T = idx.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence length T={T} exceeds seq_len={self.seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, head_dim / 2)
        x = self.drop(self.tok_emb(idx))  # (B, T, d_model)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            V = logits.size(-1)
            loss = F.cross_entropy(logits.float().view(-1, V), targets.view(-1), ignore_index=-100)
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights once; exclude_embeddings drops token embedding and untied head."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if not self.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (PaLM): 6 * N + 12 * n_layer * d_model * seq_len."""
        # N counts every weight used in a matmul: non-embedding weights plus the output head; the input
        # embedding lookup performs no FLOPs. The second term is the attention score/value matmuls.
        n = self.num_params(exclude_embeddings=True) + self.lm_head.weight.numel()
        if self.num_experts:
            # A token runs through only top_k of the experts (the router counts in full).
            n -= self.n_layer * (self.num_experts - self.top_k) * 3 * self.d_model * self.mlp_hidden
        return 6 * n + 12 * self.n_layer * self.d_model * self.seq_len

    def router_losses(self) -> dict[str, torch.Tensor]:
        """Router losses of the last forward summed over layers, their weighted sum and usage; {} if dense."""
        if not self.num_experts:
            return {}
        stats = [block.mlp.stats for block in self.blocks]
        if any(s is None for s in stats):
            raise RuntimeError("router_losses() needs a forward pass first")
        out = {k: torch.stack([getattr(s, k) for s in stats]).sum() for k in ("load_balance", "auxiliary", "z_loss")}
        weighted = sum(self.router_coefs[f"{k}_coef"] * v for k, v in out.items())
        return {"router_loss": weighted, **out, "expert_usage": torch.stack([s.f for s in stats]).mean(0)}

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_token_ids: Iterable[int] | None = None,
    ) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to idx (B, T); temperature 0 means greedy decoding.

        A row that emits one of stop_token_ids is finished: the stop token stays in it and its later
        positions repeat it. Generation ends early once every row is finished (for B=1: right after the
        stop token), so the result can be shorter than T + max_new_tokens.
        """
        stops = torch.tensor(sorted(set(stop_token_ids or ())), dtype=idx.dtype, device=idx.device)
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        was_training = self.training
        self.eval()  # sampling with dropout active is never intended
        try:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.seq_len :])
                logits = logits[:, -1, :].float()  # (B, vocab)
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    nxt = torch.multinomial(probs, num_samples=1, generator=generator)
                if stops.numel():
                    nxt = torch.where(done, idx[:, -1:], nxt)  # a finished row repeats its stop token
                    done |= torch.isin(nxt, stops)
                idx = torch.cat((idx, nxt), dim=1)
                if stops.numel() and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return idx
