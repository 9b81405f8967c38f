"""Tests for the mixture-of-experts MLP (exp.model.moe) and its use in exp.model.GPT."""

import inspect
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from exp.config import EXP_KEYS
from exp.model import GPT, SwiGLU
from exp.model.moe import MoEMLP, router_stats

from . import test_model as dense
from .test_model import D, H, L, T, V, batch  # noqa: F401  (the same shapes and batches as the dense model's tests)

C = 4
HIDDEN = 128  # default SwiGLU width for D=32
LN2, LN3 = math.log(2), math.log(3)


def make(seed: int = 0, **kw) -> GPT:
    """test_model's GPT with C experts, top-2 routing."""
    return dense.make(seed, **{"num_experts": C, "top_k": 2, **kw})


def test_router_stats_by_hand_top1():
    # Softmaxes [3/4, 1/4] x2, [1/4, 3/4], [7/8, 1/8]; top-1 picks experts 0, 0, 1, 0.
    logits = torch.tensor([[LN3, 0.0], [LN3, 0.0], [0.0, LN3], [math.log(7), 0.0]])
    s = router_stats(logits, top_k=1)
    assert s.top_idx.flatten().tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(s.gates, torch.ones(4, 1))
    torch.testing.assert_close(s.f, torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(s.P, torch.tensor([2.625 / 4, 1.375 / 4]))
    torch.testing.assert_close(s.load_balance, torch.tensor(2 * (0.75 * 2.625 + 0.25 * 1.375) / 4))  # 1.15625
    torch.testing.assert_close(s.auxiliary, torch.tensor(0.25**2 + 0.25**2))
    # logsumexp is ln 4 for the first three tokens and ln 8 for the last.
    torch.testing.assert_close(s.z_loss, torch.tensor((3 * (2 * LN2) ** 2 + (3 * LN2) ** 2) / 4))


def test_router_stats_by_hand_top2():
    # Softmaxes [4, 2, 1] / 7 and [1, 2, 4] / 7; top-2 picks {0, 1} and {2, 1} with gates [2/3, 1/3].
    logits = torch.tensor([[2 * LN2, LN2, 0.0], [0.0, LN2, 2 * LN2]])
    s = router_stats(logits, top_k=2)
    assert s.top_idx.tolist() == [[0, 1], [2, 1]]
    torch.testing.assert_close(s.gates, torch.tensor([[2 / 3, 1 / 3], [2 / 3, 1 / 3]]))
    torch.testing.assert_close(s.f, torch.tensor([0.25, 0.5, 0.25]))  # 4 slots: expert 1 holds 2
    torch.testing.assert_close(s.P, torch.tensor([5 / 14, 4 / 14, 5 / 14]))
    torch.testing.assert_close(s.load_balance, torch.tensor(27 / 28))
    torch.testing.assert_close(s.auxiliary, torch.tensor(1 / 24))
    torch.testing.assert_close(s.z_loss, torch.tensor(math.log(7) ** 2))


def test_balanced_router_has_minimal_losses():
    # Token n prefers expert n % C; cyclic symmetry makes both f and P uniform.
    base = torch.tensor([3.0, 1.0, 0.5, -1.0])
    logits = torch.stack([torch.roll(base, n % C) for n in range(8)])
    s = router_stats(logits, top_k=2)
    torch.testing.assert_close(s.f, torch.full((C,), 1 / C))
    torch.testing.assert_close(s.P, torch.full((C,), 1 / C))
    torch.testing.assert_close(s.load_balance, torch.tensor(1.0))
    torch.testing.assert_close(s.auxiliary, torch.tensor(0.0))
    # Uniform probabilities alone pin load_balance at 1 whatever top-k picks from the ties.
    torch.testing.assert_close(router_stats(torch.zeros(5, C), top_k=1).load_balance, torch.tensor(1.0))


def test_router_loss_gradients_flow_through_probabilities():
    logits = torch.randn(6, C, generator=torch.Generator().manual_seed(0), requires_grad=True)
    s = router_stats(logits, top_k=2)
    assert not s.f.requires_grad
    # auxiliary: straight-through f, so d aux = sum_i 2 (f_i - 1/C) dP_i; load_balance: C * f_i dP_i.
    probs = logits.softmax(-1).mean(0)
    for loss, surrogate in [(s.auxiliary, 2 * (s.f - 1 / C) * probs), (s.load_balance, C * s.f * probs)]:
        got = torch.autograd.grad(loss, logits, retain_graph=True)[0]
        want = torch.autograd.grad(surrogate.sum(), logits, retain_graph=True)[0]
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want)


def test_moe_mlp_matches_per_token_reference():
    torch.manual_seed(0)
    moe = MoEMLP(D, 16, num_experts=C, top_k=2)
    x = torch.randn(2, 5, D)
    out = moe(x)
    s = moe.stats
    flat = x.reshape(-1, D)
    ref = torch.stack(
        [
            sum(g * moe.experts[e](flat[n]) for g, e in zip(s.gates[n], s.top_idx[n].tolist(), strict=True))
            for n in range(10)
        ]
    )
    torch.testing.assert_close(out.reshape(-1, D), ref)
    assert len(set(s.top_idx.flatten().tolist())) > 1  # several experts are actually used


@pytest.mark.parametrize("top_k", [1, 2, C])
def test_identical_experts_equal_dense(top_k):
    # Renormalised gates sum to 1, so copies of one SwiGLU behave as that SwiGLU.
    dense, moe = make(seed=0, num_experts=0), make(seed=1, top_k=top_k)
    sd = moe.state_dict()
    for k, v in dense.state_dict().items():
        if ".mlp." in k:
            for e in range(C):
                sd[k.replace(".mlp.", f".mlp.experts.{e}.")] = v
        else:
            sd[k] = v
    moe.load_state_dict(sd)
    idx, _ = batch()
    torch.testing.assert_close(moe(idx)[0], dense(idx)[0])
    assert moe.router_losses()["z_loss"] > 0  # the router really ran


def test_gpt_moe_forward_and_router_losses():
    model = make()
    with pytest.raises(RuntimeError, match="forward"):
        model.router_losses()
    idx, tgt = batch(3, 10)
    logits, loss = model(idx, tgt)
    assert logits.shape == (3, 10, V) and loss.ndim == 0
    rl = model.router_losses()
    assert list(rl) == ["router_loss", "load_balance", "auxiliary", "z_loss", "expert_usage"]
    per_layer = [b.mlp.stats for b in model.blocks]
    for k in ("load_balance", "auxiliary", "z_loss"):
        torch.testing.assert_close(rl[k], sum(getattr(s, k) for s in per_layer))
    torch.testing.assert_close(rl["router_loss"], 0.01 * rl["load_balance"] + 0.001 * rl["z_loss"])
    usage = rl["expert_usage"]
    assert usage.shape == (C,) and not usage.requires_grad
    torch.testing.assert_close(usage.sum(), torch.tensor(1.0))
    assert rl["router_loss"].requires_grad
    rl["router_loss"].backward()
    for b in model.blocks:
        assert b.mlp.router.weight.grad.abs().sum() > 0
    assert make(num_experts=0).router_losses() == {}


def test_cross_entropy_reaches_router_and_experts():
    model = make()
    idx, tgt = batch()
    model(idx, tgt)[1].backward()
    for n, p in model.named_parameters():
        if ".mlp." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_runs_under_autocast_and_in_bf16():
    model = make()
    idx, tgt = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, tgt)
    assert torch.isfinite(loss) and model.router_losses()["z_loss"].dtype == torch.float32
    logits, _ = make().to(torch.bfloat16)(idx)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("t", [0, T - 2])
def test_causal(t):
    model = make().eval()
    idx, _ = batch(2, T)
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % V
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_param_count_flops_and_meta_construction():
    real = make()
    names = dict(real.named_parameters())
    assert names["blocks.0.mlp.router.weight"].shape == (C, D)
    assert names[f"blocks.1.mlp.experts.{C - 1}.down.weight"].shape == (D, HIDDEN)
    dense = make(num_experts=0)
    extra = L * ((C - 1) * 3 * D * HIDDEN + C * D)  # C - 1 more experts plus the router, per layer
    assert real.num_params() == dense.num_params() + extra
    # Only top_k experts run per token: FLOPs exceed the dense model's by (top_k - 1) experts and the router.
    assert real.flops_per_token() == dense.flops_per_token() + 6 * L * (1 * 3 * D * HIDDEN + C * D)
    with torch.device("meta"):
        meta = GPT(V, T, L, H, D, num_experts=C, top_k=2)
    assert all(p.is_meta for p in meta.parameters())
    assert meta.num_params() == real.num_params()
    assert meta.flops_per_token() == real.flops_per_token()


def test_expert_output_projections_get_residual_init():
    model = make(n_layer=2, d_model=128, num_experts=2)
    resid = 0.02 / (2 * 2) ** 0.5
    std = model.blocks[1].mlp.experts[1].down.weight.std().item()
    torch.testing.assert_close(std, resid, rtol=0.05, atol=0)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(num_experts=-1), "num_experts"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=C + 1), "top_k"),
        (dict(load_balance_coef=-0.1), "load_balance_coef"),
        (dict(auxiliary_coef=-1.0), "auxiliary_coef"),
        (dict(z_loss_coef=-1e-3), "z_loss_coef"),
    ],
)
def test_constructor_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        make(**kw)


def test_dense_ignores_top_k():
    assert isinstance(make(num_experts=0, top_k=7).blocks[0].mlp, SwiGLU)


def test_activation_checkpointing_matches():
    idx, tgt = batch()
    grads = []
    for ckpt in (False, True):
        model = make(seed=5, activation_checkpointing=ckpt, auxiliary_coef=0.1).train()
        _, loss = model(idx, tgt)
        (loss + model.router_losses()["router_loss"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_overfits_single_batch_with_router_loss():
    model = make(seed=0)
    idx, tgt = batch(4, T, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(50):
        _, loss = model(idx, tgt)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        (loss + model.router_losses()["router_loss"]).backward()
        opt.step()
    final = model(idx, tgt)[1].item()
    assert final < 0.5 * first, (first, final)


def test_config_keys_are_constructor_parameters():
    cfg = OmegaConf.load(Path(__file__).parents[2] / "conf" / "model" / "gpt_moe_tiny.yaml")
    params = inspect.signature(GPT).parameters
    own = {"_target_", *EXP_KEYS["model"]}  # exp's own keys: freeze, recipe (exp.config.EXP_KEYS)
    assert set(cfg) - own <= set(params)
    assert cfg.num_experts == 4 and cfg.top_k == 2
    kw = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in own | {"vocab_size"}}
    with torch.device("meta"):
        model = GPT(vocab_size=264, **kw)
    assert model.num_experts == 4 and model.router_coefs["z_loss_coef"] == cfg.z_loss_coef


def test_a_mixture_of_experts_generates_with_the_key_value_cache_as_without():
    from exp.model.protocol import sample

    torch.manual_seed(0)
    model = GPT(vocab_size=264, seq_len=32, n_layer=2, n_head=2, d_model=32, num_experts=4, top_k=2).eval()
    prompt = torch.randint(0, 256, (2, 6))
    assert torch.equal(model.generate(prompt, 20, temperature=0), sample(model, prompt, 20, temperature=0, seq_len=32))
