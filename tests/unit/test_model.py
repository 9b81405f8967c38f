"""Tests for exp.model.GPT."""

import pytest
import torch
import torch.nn.functional as F

import exp.model.gpt as model_mod
from exp.model import GPT, RMSNorm, apply_rope, rope_cache
from exp.model.layers import BlockMask, document_ids, document_mask

V, T, L, H, D = 64, 16, 2, 4, 32


def make(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, seq_len=T, n_layer=L, n_head=H, d_model=D)
    cfg.update(kw)
    return GPT(**cfg)


def batch(b: int = 2, t: int = T, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g), torch.randint(0, V, (b, t), generator=g)


def test_shapes_and_loss_matches_cross_entropy():
    model = make()
    idx, tgt = batch(3, 10)
    logits, loss = model(idx, tgt)
    assert logits.shape == (3, 10, V)
    assert loss.ndim == 0
    ref = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert model(idx)[1] is None


def test_ignored_targets_excluded_from_mean():
    model = make()
    idx, tgt = batch(2, T)
    tgt = tgt.clone()
    tgt[0, :5] = -100
    tgt[1, -3:] = -100
    logits, loss = model(idx, tgt)
    logp = F.log_softmax(logits.float(), dim=-1)
    keep = tgt != -100
    nll = -logp[keep].gather(-1, tgt[keep].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(loss, nll.mean())
    # The ignored positions are genuinely excluded: the unmasked mean differs.
    assert not torch.allclose(loss, F.cross_entropy(logits.reshape(-1, V), batch(2, T)[1].reshape(-1)))


def test_sequence_longer_than_seq_len_rejected():
    with pytest.raises(ValueError, match="seq_len"):
        make()(torch.zeros(1, T + 1, dtype=torch.long))


@pytest.mark.parametrize("t", [0, 5, T - 2])
def test_causal(t):
    model = make().eval()
    idx, _ = batch(2, T)
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % V
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_tied_embeddings_counted_once():
    model = make()
    assert model.lm_head.weight is model.tok_emb.weight
    unique = {id(p): p for p in model.parameters()}
    assert model.num_params() == sum(p.numel() for p in unique.values())
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert "lm_head.weight" in names and "tok_emb.weight" in names
    assert model.num_params(exclude_embeddings=True) == model.num_params() - V * D

    untied = make(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() == model.num_params() + V * D
    assert untied.num_params(exclude_embeddings=True) == model.num_params(exclude_embeddings=True)


def test_param_names_and_exact_count():
    model = make(n_kv_head=2)
    hidden = 128  # 8/3 * 32 = 85.3, rounded up to a multiple of 64
    assert model.mlp_hidden == hidden
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    hd = D // H
    assert shapes["blocks.1.attn.qkv.weight"] == ((H + 2 * 2) * hd, D)
    assert shapes["blocks.0.attn.proj.weight"] == (D, D)
    assert shapes["blocks.0.mlp.gate.weight"] == (hidden, D)
    assert shapes["blocks.0.mlp.up.weight"] == (hidden, D)
    assert shapes["blocks.0.mlp.down.weight"] == (D, hidden)
    for name in ["blocks.0.attn_norm.weight", "blocks.0.mlp_norm.weight", "norm.weight"]:
        assert shapes[name] == (D,)
    assert not any("bias" in n for n in shapes)
    per_layer = 2 * D + (H + 4) * hd * D + D * D + 3 * D * hidden
    assert model.num_params() == V * D + D + L * per_layer
    n_matmul = model.num_params()  # tied: the embedding matrix is also the head matmul
    assert model.flops_per_token() == 6 * n_matmul + 12 * L * D * T


def test_init_scales():
    model = make(n_layer=8, d_model=128, n_head=4, init_std=0.02)
    torch.testing.assert_close(model.tok_emb.weight.std().item(), 0.02, rtol=0.05, atol=0)
    resid = 0.02 / (2 * 8) ** 0.5
    torch.testing.assert_close(model.blocks[3].attn.proj.weight.std().item(), resid, rtol=0.05, atol=0)
    torch.testing.assert_close(model.blocks[3].mlp.down.weight.std().item(), resid, rtol=0.05, atol=0)
    assert torch.equal(model.norm.weight, torch.ones(128))


def test_rmsnorm():
    norm = RMSNorm(D, eps=1e-6)
    x = 3.0 * torch.randn(4, 5, D)
    y = norm(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4, 5), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        norm.weight.mul_(2.0)
    torch.testing.assert_close(norm(x), 2 * y)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_rope_dot_products_depend_only_on_offset():
    hd = 8
    cos, sin = rope_cache(32, hd, 10000.0)
    assert cos.shape == sin.shape == (32, hd)
    torch.testing.assert_close(cos[:, : hd // 2], cos[:, hd // 2 :])  # one angle per pair (i, i + hd/2)
    torch.testing.assert_close(sin[:, : hd // 2], -sin[:, hd // 2 :])
    torch.testing.assert_close(cos[5, 1], torch.tensor(5 * 10000.0 ** (-2 / hd)).cos())
    q, k = torch.randn(2, hd, dtype=torch.float64)
    rot = lambda x, p: apply_rope(x.view(1, 1, 1, hd), cos[p : p + 1], sin[p : p + 1]).flatten()
    torch.testing.assert_close(rot(q, 3).norm(), q.norm())
    torch.testing.assert_close(rot(q, 7) @ rot(k, 2), rot(q, 20) @ rot(k, 15))
    assert not torch.allclose(rot(q, 7) @ rot(k, 2), rot(q, 7) @ rot(k, 5))


def test_rope_is_the_split_rotation_to_the_bit():
    """apply_rope's four-kernel form gives exactly the textbook split form's numbers (x1 cos - x2 sin, ...)."""
    hd, T = 16, 32
    cos, sin = rope_cache(T, hd, 10000.0)
    x = torch.randn(3, 4, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, : hd // 2], sin[:, hd // 2 :]
    assert torch.equal(apply_rope(x, cos, sin), torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))


def test_model_is_position_aware():
    # One causal layer without positional encoding would see the prefix as an unordered set.
    model = make(n_layer=1).eval()
    idx, _ = batch(1, 6)
    swapped = idx[:, [1, 0, 2, 3, 4, 5]]
    assert not torch.allclose(model(idx)[0][:, -1], model(swapped)[0][:, -1])


def test_rope_buffers_not_persistent_and_state_dict_roundtrip():
    a = make(seed=0)
    buffers = dict(a.named_buffers())
    assert "rope_cos" in buffers and "rope_sin" in buffers  # moved by .to() with the module
    sd = a.state_dict()
    assert not any("rope" in k for k in sd)
    b = make(seed=123)
    idx, _ = batch()
    assert not torch.allclose(a(idx)[0], b(idx)[0])
    b.load_state_dict(sd)
    torch.testing.assert_close(a(idx)[0], b(idx)[0], rtol=0, atol=0)
    assert b.lm_head.weight is b.tok_emb.weight


def test_to_dtype_moves_rope_buffers():
    model = make().to(torch.float64)
    assert model.rope_cos.dtype == torch.float64
    idx, tgt = batch()
    logits, loss = model(idx, tgt)
    assert logits.dtype == torch.float64 and torch.isfinite(loss)


def test_meta_device_construction():
    with torch.device("meta"):
        meta = GPT(V, T, L, H, D, n_kv_head=2)
    assert all(p.is_meta for p in meta.parameters())
    real = make(n_kv_head=2)
    assert meta.num_params() == real.num_params()
    assert meta.num_params(exclude_embeddings=True) == real.num_params(exclude_embeddings=True)
    assert meta.flops_per_token() == real.flops_per_token()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_matches(dropout):
    idx, tgt = batch()
    grads, losses = [], []
    for ckpt in (False, True):
        model = make(seed=5, activation_checkpointing=ckpt, dropout=dropout).train()
        torch.manual_seed(11)  # same dropout masks; recomputation must replay them
        _, loss = model(idx, tgt)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_checkpointing_only_while_training(monkeypatch):
    calls = []
    real = model_mod.checkpoint
    monkeypatch.setattr(model_mod, "checkpoint", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model = make(activation_checkpointing=True)
    idx, tgt = batch()
    model.train()(idx, tgt)
    assert calls == [{"use_reentrant": False}] * L
    calls.clear()
    model.eval()(idx, tgt)
    assert calls == []


def test_dropout_only_in_training():
    model = make(dropout=0.2)
    idx, _ = batch()
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_gqa_runs_and_gradients_flow():
    model = make(n_kv_head=1)
    idx, tgt = batch()
    _, loss = model(idx, tgt)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_gqa_equals_mha_with_shared_kv_heads():
    gqa = make(seed=0, n_kv_head=2)
    mha = make(seed=1)
    sd = gqa.state_dict()
    hd, rep = D // H, H // 2
    for i in range(L):
        key = f"blocks.{i}.attn.qkv.weight"
        q, k, v = sd[key].split([H * hd, 2 * hd, 2 * hd])
        # Query head h uses kv head h // rep, so duplicate each kv head rep times.
        k = k.view(2, hd, D).repeat_interleave(rep, 0).reshape(H * hd, D)
        v = v.view(2, hd, D).repeat_interleave(rep, 0).reshape(H * hd, D)
        sd[key] = torch.cat([q, k, v])
    mha.load_state_dict(sd)
    idx, _ = batch()
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0])


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(d_model=30, n_head=4), "d_model"),
        (dict(d_model=36, n_head=4), "head_dim"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(seq_len=0), "seq_len"),
        (dict(mlp_hidden=0), "mlp_hidden"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_constructor_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        make(**kw)


def test_generate_length_and_seeded_determinism():
    model = make()
    idx = batch(2, 4)[0]
    out = model.generate(idx, 20, generator=torch.Generator().manual_seed(0))  # 24 > seq_len: crops
    assert out.shape == (2, 24)
    assert torch.equal(out[:, :4], idx)
    again = model.generate(idx, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    other = model.generate(idx, 20, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)


def test_generate_greedy_is_argmax():
    model = make(dropout=0.1).train()
    idx = batch(2, 5)[0]
    out = model.generate(idx, 15, temperature=0.0)
    assert model.training  # mode restored
    model.eval()
    for i in range(5, out.shape[1]):
        logits, _ = model(out[:, max(0, i - T) : i])
        assert torch.equal(out[:, i], logits[:, -1].argmax(-1)), i
    # top_k=1 sampling collapses to greedy.
    top1 = model.generate(idx, 15, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, out)


def test_overfits_single_batch():
    model = make(seed=0)
    idx, tgt = batch(4, T, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(50):
        _, loss = model(idx, tgt)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    final = model(idx, tgt)[1].item()
    assert final < 0.5 * first, (first, final)


def test_documents_packed_in_a_row_are_computed_as_each_alone():
    """doc_ids: attention never crosses a document boundary and rotary positions restart at each document; without
    them the later documents see the earlier ones."""
    torch.manual_seed(0)
    model = GPT(vocab_size=264, seq_len=32, n_layer=2, d_model=64, n_head=4, n_kv_head=2).eval()
    docs = [torch.randint(0, 256, (1, n)) for n in (11, 9, 12)]
    row = torch.cat(docs, 1)
    doc_ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], 1)
    with torch.no_grad():
        packed = model(row, doc_ids=doc_ids)[0]
        plain = model(row)[0]
        start = 0
        for doc in docs:
            alone = model(doc)[0]
            assert torch.allclose(packed[:, start : start + doc.shape[1]], alone, atol=1e-5)
            start += doc.shape[1]
        assert not torch.allclose(plain[:, 11:20], model(docs[1])[0], atol=1e-2)  # the mask is what does it
        assert torch.allclose(model(row, doc_ids=torch.zeros_like(doc_ids))[0], plain, atol=1e-6)  # one document


def test_document_ids_start_a_new_document_after_each_end_token():
    x = torch.tensor([[5, 6, 256, 7, 256, 256, 8], [256, 1, 2, 3, 4, 5, 6]])
    assert document_ids(x, 256).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def test_flex_attention_block_mask_agrees_with_the_sdpa_mask():
    """The GPU path (FlexAttention over a BlockMask, run eagerly here) and the CPU path (SDPA with a boolean
    block-diagonal mask) give the same attention, GQA included; both differ from plain causal attention."""
    import warnings

    torch.manual_seed(0)
    model = GPT(vocab_size=264, seq_len=32, n_layer=1, d_model=64, n_head=4, n_kv_head=2).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 32, 64)
    doc_ids = torch.cumsum(torch.rand(2, 32) < 0.15, 1)
    cos, sin = model.rope_cos[:32], model.rope_sin[:32]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that eager mode is slow
        flex = attn(x, cos, sin, document_mask(doc_ids, flex=True))
        sdpa = attn(x, cos, sin, document_mask(doc_ids, flex=False))
        causal = attn(x, cos, sin, None)
    assert torch.allclose(flex, sdpa, atol=1e-5)
    assert not torch.allclose(flex, causal, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpt_on_cuda_masks_documents_through_compiled_flex_attention():
    """On CUDA the document mask is FlexAttention's BlockMask, compiled: the packed documents still compute as each
    alone, forward and backward."""
    torch.manual_seed(0)
    model = GPT(vocab_size=264, seq_len=256, n_layer=2, d_model=128, n_head=4).cuda()
    docs = [torch.randint(0, 256, (1, n), device="cuda") for n in (100, 60, 96)]
    row = torch.cat(docs, 1)
    doc_ids = torch.cat([torch.full((1, d.shape[1]), i, device="cuda") for i, d in enumerate(docs)], 1)
    assert isinstance(document_mask(doc_ids), BlockMask)
    logits, loss = model(row, row, doc_ids=doc_ids)
    loss.backward()
    start = 0
    with torch.no_grad():
        for doc in docs:
            alone = model(doc)[0]
            assert torch.allclose(logits[:, start : start + doc.shape[1]], alone, atol=1e-4)
            start += doc.shape[1]
