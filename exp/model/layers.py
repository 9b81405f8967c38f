"""The transformer layers GPT and the MoE MLP share: RMSNorm, rotary embeddings, attention with GQA, SwiGLU."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned 1-D scale."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension: PyTorch's fused rms_norm (one kernel in eager mode, not six)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # statistics in fp32 so bf16/fp16 activations do not lose precision in the mean of squares
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation tables of positions 0..seq_len-1, (seq_len, head_dim) each, for the half-split (GPT-NeoX,
    Llama) pairing of dimension i with i + head_dim/2: cos repeated over both halves, and sin negated over the first
    half (apply_rope then needs no split and no concatenation: four kernels, not eight, in eager mode)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, H, D) or (B, H, T, D) vectors by position: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for
    the halves x1, x2 of D, written as x * cos + swap_halves(x) * sin with rope_cache's tables, which broadcast
    against x (cos/sin (T, 1, D) for the first layout, (T, D) for the second, (B, 1, T, D) when each row has positions
    of its own: document_positions). The same floating-point products and sums as the split form."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids (non-decreasing along a row) -> each token's position inside its own document."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values  # each doc's start
    return index - first


def document_ids(x: torch.Tensor, end_token: int) -> torch.Tensor:
    """(B, T) token ids of rows packed with documents, each ending in `end_token` -> (B, T) document ids: a new
    document starts after each end token (which belongs to the document it ends)."""
    ends = (x == end_token).to(torch.int32)
    return ends.cumsum(1) - ends


def document_mask(doc_ids: torch.Tensor, flex: bool | None = None) -> torch.Tensor | BlockMask:
    """(B, T) document ids -> the attention mask: causal, and never across a document boundary.

    FlexAttention's BlockMask on CUDA (flex=None), where the compiled kernel skips the blocks no document
    spans; elsewhere a (B, 1, T, T) boolean block-diagonal causal mask for scaled_dot_product_attention, whose
    eager CPU path takes it. flex=True/False picks one explicitly (tests compare them)."""
    flex = doc_ids.is_cuda if flex is None else flex
    if flex:

        def same_document_causal(b, h, q, kv):
            return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

        B, T = doc_ids.shape
        return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, :, None] == doc_ids[:, None, :]).logical_and(causal)[:, None]


@functools.cache
def _compiled_flex_attention():
    # flex_attention is only fast compiled (eager, it materialises the scores); compiled once per process
    return torch.compile(flex_attention, dynamic=False)


def attend(q, k, v, mask: torch.Tensor | BlockMask | None, dropout: float) -> torch.Tensor:
    """Attention of (B, H, T, hd) queries over keys/values: causal without a mask, else under `mask`
    (document_mask's BlockMask through FlexAttention, or a boolean tensor through SDPA)."""
    if isinstance(mask, BlockMask):
        if dropout:
            raise ValueError("FlexAttention has no attention dropout: set model.dropout=0 with a document mask on GPU")
        run = _compiled_flex_attention() if q.is_cuda else flex_attention
        return run(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)


class KVCache:
    """Each layer's keys and values of the tokens generated so far, preallocated for `max_len` tokens: a forward then
    runs over the new tokens only. Rotary positions go on past the model's seq_len (as transformers' Llama does);
    `rope` holds the cos/sin tables of every position the cache can reach."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int, rope, dtype, device):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.cos, self.sin = rope
        self.pos = 0  # tokens held

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' k, v (B, nkv, T, hd) after the held ones, and attend the new queries over all."""
        T, end = k.shape[2], self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if q.shape[1] != keys.shape[1]:  # grouped-query attention: query head h reads key/value head h // group
            keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
            values = values.repeat_interleave(q.shape[1] // values.shape[1], dim=1)
        if T == 1:  # one new token sees every held one
            return F.scaled_dot_product_attention(q, keys, values)
        if self.pos == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=self.pos)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None, cache=None, layer: int = 0):
        """x: (B, T, d_model) -> (B, T, d_model); `mask` (document_mask's), when given, replaces the causal mask;
        with a KVCache, x is the tokens after the cached ones (this is layer `layer` of it)."""
        B, T, C = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        qk, v = self.qkv(x).view(B, T, nh + 2 * nkv, hd).transpose(1, 2).split([nh + nkv, nkv], dim=1)
        q, k = apply_rope(qk, cos, sin).split([nh, nkv], dim=1)  # queries and keys in one rotation
        if cache is not None:
            y = cache.attend(layer, q, k, v).transpose(1, 2).reshape(B, T, C)
            return self.resid_drop(self.proj(y))
        if nkv != nh:
            # Query head h reads key/value head h // (nh // nkv).
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, dropout)
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
