"""The loop on its own: accumulation, clipping, callbacks, evaluation, NaN detection, every optimizer x scheduler."""

import itertools
import math

import pytest
import torch
from hydra.utils import instantiate

from exp import hardware, loop
from exp.config import component
from exp.losses import lm_loss
from exp.model import GPT
from exp.optim import build_optimizer
from exp.stages import Pretrain

from ..conftest import CONF_DIR

CPU = hardware.Runtime(device=torch.device("cpu"), dtype=torch.float32)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(vocab_size=32, seq_len=16, n_layer=2, n_head=2, d_model=32)


def stage(cls=Pretrain, **kw):
    base = dict(
        name="pretrain",
        num_steps=4,
        batch_size_per_gpu=8,
        learning_rate=1e-2,
        log_every_n_steps=2,
        eval_every_n_steps=2,
        num_eval_batches=1,
    )
    return cls(**{**base, **kw})


def fixed_batches(num_rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 32, (num_rows, 17), generator=g)
    return data[:, :-1], data[:, 1:]


def test_loss_ignores_masked_targets():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, -100, 2], [-100, 4, 0]])
    out = lm_loss(logits, targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(out["loss"], expected)
    assert out["num_tokens"].item() == 4
    pred = logits.argmax(-1)
    assert out["accuracy"].item() == pytest.approx(((pred == targets) & keep).sum().item() / 4)


def test_gradient_accumulation_matches_one_big_batch():
    x, y = fixed_batches(16)
    results = []
    for batch, accum in ((16, 1), (8, 2)):
        model = tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        st = stage(batch_size_per_gpu=batch, gradient_accumulation_steps=accum)
        losses, grads = [], None
        for _ in range(3):
            micro = iter([(x[i : i + batch], y[i : i + batch]) for i in range(0, 16, batch)])
            opt.zero_grad()
            out = loop.train_step(st, model, opt, micro, CPU)
            grads = grads or [p.grad.clone() for p in model.parameters()]
            losses.append(out["loss"].item())
            opt.step()
        results.append((losses, grads, [p.detach().clone() for p in model.parameters()]))
    (losses_a, grads_a, params_a), (losses_b, grads_b, params_b) = results
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(params_a, params_b, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_clipping_reports_the_unclipped_norm_and_clips():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = loop.train_step(stage(max_grad_norm=1e-3), model, opt, iter([fixed_batches(8)]), CPU)
    total = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert out["grad_norm"].item() > 1e-3
    assert total.item() == pytest.approx(1e-3, rel=1e-3)


class Recorder(loop.Callback):
    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_step_end(self, state, loss):
        self.events.append(("step", state.step))
        self.should_stop = state.step == self.stop_at

    def on_log(self, state, metrics):
        self.events.append(("log", state.step, metrics))

    def on_eval_end(self, state, metrics):
        self.events.append(("eval", state.step, metrics))


def run_loop(st, callbacks, model=None, batches=None):
    model = model or tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=st.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    batches = batches or itertools.repeat(fixed_batches(st.batch_size_per_gpu))
    val = [fixed_batches(4, seed=9)]
    return loop.train(loop.Trained(st, model, opt, sched, CPU), batches, val, callbacks, loop.TrainState())


def test_callbacks_are_called_on_their_intervals():
    rec = Recorder()
    state = run_loop(stage(num_steps=5, log_every_n_steps=2, eval_every_n_steps=3), [rec])
    kinds = [(e[0], e[1]) for e in rec.events]
    assert [s for k, s in kinds if k == "step"] == [1, 2, 3, 4, 5]
    assert [s for k, s in kinds if k == "log"] == [2, 4, 5]  # and the last step always
    assert [s for k, s in kinds if k == "eval"] == [3, 5]
    log = [e for e in rec.events if e[0] == "log"][0][2]
    for key in (
        "train/loss",
        "train/loss_ema",
        "train/perplexity",
        "train/accuracy",
        "train/grad_norm",
        "train/lr",
        "perf/tokens_per_s",
        "perf/samples_per_s",
        "perf/peak_memory_mb",
    ):
        assert math.isfinite(log[key]), key
    assert log["train/perplexity"] == pytest.approx(math.exp(log["train/loss"]))
    assert state.step == 5 and state.tokens_seen == 5 * 8 * 16
    assert state.val_loss == [e for e in rec.events if e[0] == "eval"][-1][2]["val/loss"]


class CountingPretrain(Pretrain):
    """Records, per call, whether the loop asked for the diagnostics and the accuracy it then measured."""

    def __post_init__(self):
        super().__post_init__()
        self.calls = []

    def train_step(self, model, batch, diagnostics=True):
        out = super().train_step(model, batch, diagnostics)
        self.calls.append(out["accuracy"].item() if diagnostics else None)
        return out


def test_accuracy_is_measured_only_on_the_step_that_closes_a_log_interval():
    st = stage(CountingPretrain, num_steps=5, eval_every_n_steps=100, gradient_accumulation_steps=2)
    rec = Recorder()
    run_loop(st, [rec])
    # 5 steps x 2 micro-batches; the last micro-batch of steps 2, 4 and 5 (the last step always logs)
    asked = [i for i, acc in enumerate(st.calls) if acc is not None]
    assert asked == [3, 7, 9]
    logged = [e[2]["train/accuracy"] for e in rec.events if e[0] == "log"]
    assert logged == pytest.approx([st.calls[i] for i in asked])


def test_should_stop_ends_the_run_early():
    state = run_loop(stage(num_steps=10), [Recorder(stop_at=3)])
    assert state.step == 3


def test_loss_falls_on_a_fixed_batch():
    rec = Recorder()
    run_loop(stage(num_steps=30, log_every_n_steps=10, eval_every_n_steps=30), [rec])
    losses = [e[2]["train/loss"] for e in rec.events if e[0] == "log"]
    assert losses[-1] < 0.5 * losses[0]


def test_non_finite_loss_stops_at_once():
    model = tiny_model()
    with torch.no_grad():
        model.tok_emb.weight[3, 0] = float("nan")
    x, y = fixed_batches(8)
    x[0, 0] = 3
    with pytest.raises(loop.TrainingFailed, match="step 1"):
        run_loop(stage(), [], model=model, batches=itertools.repeat((x, y)))


def test_evaluate_is_token_weighted_and_restores_train_mode():
    model = tiny_model()
    batches = [fixed_batches(4, seed=s) for s in (1, 2)]
    out = loop.evaluate(stage(), model, batches, CPU)
    assert model.training
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(x)[0].view(-1, 32), y.reshape(-1)) for x, y in batches]
    assert out["loss"] == pytest.approx(sum(losses).item() / 2, rel=1e-5)


OPTIMIZERS = sorted(p.stem for p in (CONF_DIR / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONF_DIR / "scheduler").glob("*.yaml"))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_optimizer_and_scheduler_take_a_step(make_cfg, optimizer, scheduler):
    cfg = make_cfg(f"optimizer={optimizer}", f"scheduler={scheduler}", "stage.num_steps=10", "stage.warmup_steps=2")
    model = tiny_model()
    opt = build_optimizer(instantiate(component(cfg, "optimizer")), model, device=torch.device("cpu"))
    sched = instantiate(cfg.scheduler)(opt)
    before = [p.detach().clone() for p in model.parameters()]
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        loop.train_step(stage(), model, opt, iter([fixed_batches(8)]), CPU)
        opt.step()
        sched.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False))
    base = cfg.optimizer.lr
    expected = [base * sched.lr_lambdas[0](i) for i in range(3)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] < base  # the first warmup step: every schedule, constant included, honours warmup


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_trains_with_fp32_master_weights(dtype):
    rt = hardware.Runtime(device=torch.device("cpu"), dtype=dtype)
    model = tiny_model()
    st = stage(num_steps=20, log_every_n_steps=10, eval_every_n_steps=20)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    scaler = rt.grad_scaler()
    assert (scaler is not None) == (dtype is torch.float16)
    rec = Recorder()
    trained = loop.Trained(st, model, opt, sched, rt, scaler)
    loop.train(trained, itertools.repeat(fixed_batches(8)), [fixed_batches(4)], [rec], loop.TrainState())
    losses = [e[2]["train/loss"] for e in rec.events if e[0] == "log"]
    assert losses[-1] < losses[0]
    assert all(p.dtype is torch.float32 for p in model.parameters())
