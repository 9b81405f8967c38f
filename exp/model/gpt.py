"""Decoder-only GPT: RMSNorm pre-norm, rotary attention with optional GQA, SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from exp.model.layers import (
    Attention,
    KVCache,
    RMSNorm,
    SwiGLU,
    document_mask,
    document_positions,
    rope_cache,
)
from exp.model.moe import MoEMLP
from exp.model.protocol import sample


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model, n_head, n_kv_head, mlp_hidden, dropout, norm_eps, num_experts=0, top_k=2):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_head, n_kv_head, dropout)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        if num_experts:
            self.mlp = MoEMLP(d_model, mlp_hidden, num_experts, top_k, dropout)
        else:
            self.mlp = SwiGLU(d_model, mlp_hidden, dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None, cache=None, layer: int = 0):
        """x: (B, T, d_model) -> (B, T, d_model)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
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
        self.rope_theta = rope_theta

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
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (B, T) int64 -> logits (B, T, vocab), mean CE over targets != -100 (or None).

        doc_ids (B, T), non-decreasing along each row, says which document each token belongs to when several are
        packed in a row: attention then never crosses a document boundary and rotary positions restart at each
        document, so each document is computed as it would be alone. None: one causal sequence per row."""
        T = idx.shape[1]
        if cache is not None:  # generation: the tokens after the cached ones, at their positions
            return self._forward_cached(idx, cache), None
        if T > self.seq_len:
            raise ValueError(f"sequence length T={T} exceeds seq_len={self.seq_len}")
        cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None  # (T, head_dim)
        if doc_ids is not None:
            positions = document_positions(doc_ids)  # (B, T)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, hd)
            # FlexAttention on CUDA; SDPA's boolean mask on CPU, and with attention dropout (flex has none)
            mask = document_mask(doc_ids, flex=idx.is_cuda and not (self.training and self.drop.p > 0))
        x = self.drop(self.tok_emb(idx))  # (B, T, d_model)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            V = logits.size(-1)
            loss = F.cross_entropy(logits.float().view(-1, V), targets.view(-1), ignore_index=-100)
        return logits, loss

    def _forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        start, end = cache.pos, cache.pos + idx.shape[1]
        cos, sin = cache.cos[start:end], cache.sin[start:end]
        x = self.tok_emb(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None, cache, i)
        cache.pos = end
        return self.lm_head(self.norm(x))

    def kv_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KVCache for `batch` rows of up to max_len tokens, in this model's dtype and device."""
        rope = (self.rope_cos, self.rope_sin)
        if max_len > self.seq_len:  # positions past the trained context: the same rotary tables, extended
            cos, sin = rope_cache(max_len, self.d_model // self.n_head, self.rope_theta)
            rope = (cos.to(self.rope_cos.device), sin.to(self.rope_sin.device))
        head_dim = self.d_model // self.n_head
        weight = self.tok_emb.weight
        return KVCache(self.n_layer, batch, self.n_kv_head, head_dim, max_len, rope, weight.dtype, weight.device)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights once; exclude_embeddings drops token embedding and untied head."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if not self.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (PaLM): 6 * N + 12 * n_layer * d_model * seq_len (default: self.seq_len)."""
        # N counts every weight used in a matmul: non-embedding weights plus the output head; the input
        # embedding lookup performs no FLOPs. The second term is the attention score/value matmuls.
        n = self.num_params(exclude_embeddings=True) + self.lm_head.weight.numel()
        if self.num_experts:
            # A token runs through only top_k of the experts (the router counts in full).
            n -= self.n_layer * (self.num_experts - self.top_k) * 3 * self.d_model * self.mlp_hidden
        return 6 * n + 12 * self.n_layer * self.d_model * (seq_len or self.seq_len)

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

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to idx (B, T) with a key/value cache: the prompt runs once,
        then each step runs over its one new token. Every token sees all the tokens before it, rotary positions
        going on past seq_len, as transformers' Llama (and so this model's HF export) generates. options:
        temperature (0 = greedy), top_k, generator, stop_token_ids, vocab_limit (exp.model.protocol.sample)."""
        cache = self.kv_cache(idx.size(0), idx.size(1) + max_new_tokens)

        def step(ids: torch.Tensor, new: int) -> torch.Tensor:
            return self.forward(ids[:, -new:], cache=cache)[0][:, -1, :]

        return sample(self, idx, max_new_tokens, step=step, **options)
