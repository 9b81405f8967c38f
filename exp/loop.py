"""The training loop: the optimizer step, evaluation, and the callback calls. No files, tracking or launching."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from exp.dist import Dist, grad_sync
from exp.errors import TrainingFailed
from exp.events import Callback, Events, TrainState  # noqa: F401  (Callback: users subclass exp.loop.Callback)
from exp.hardware import Runtime
from exp.perf import mfu

SINGLE = Dist()

EMA_BETA = 0.9  # smoothing of the per-step loss reported as train/loss_ema


class FailFast:
    """The guard without recovery: the first non-finite loss ends the run (exp.faults.FaultGuard recovers)."""

    def should_skip(self, state: TrainState, loss: float, grad_norm: float, finite: bool) -> bool:
        if not finite:
            raise TrainingFailed(nonfinite_message(state, loss, grad_norm))
        return False


def nonfinite_message(state: TrainState, loss: float, grad_norm: float) -> str:
    what = "loss" if not math.isfinite(loss) else "gradient norm" if not math.isfinite(grad_norm) else "loss spike"
    return (
        f"{what} at step {state.step + 1} (loss={loss:.4g}, grad_norm={grad_norm:.4g}); "
        "lower stage.learning_rate or check the data"
    )


def train_step(stage, model, optimizer, batches: Iterator, rt: Runtime, scaler=None, diagnostics: bool = True) -> dict:
    """Accumulate gradients over the stage's micro-batches and clip them; the optimizer is not stepped here.

    Returns the step's loss and gradient norm (0-d tensors), its number of inputs, and the stage's other
    metrics (kd_loss, ...) as detached tensors averaged over the micro-batches. With `diagnostics` the
    stage also measures what costs extra work (accuracy), on the last micro-batch. Nothing is read back
    to the host: on a tiny model every extra tensor operation is a visible share of the step.
    """
    num_micro = stage.gradient_accumulation_steps
    losses, parts, num_inputs = [], [], 0
    for i in range(num_micro):
        x, y = next(batches)
        if x.device != rt.device:
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with grad_sync(model, enabled=i == num_micro - 1), rt.autocast():
            out = stage.train_step(model, (x, y), diagnostics and i == num_micro - 1)
            loss = out["loss"] if num_micro == 1 else out["loss"] / num_micro  # each micro-batch counts 1/num_micro
            (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(loss.detach())
        parts.append({k: v.detach() for k, v in out.items() if k not in ("loss", "num_tokens")})
        num_inputs += x.numel()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    if num_micro == 1:
        return {"loss": losses[0], "grad_norm": grad_norm, "num_inputs": num_inputs, "metrics": parts[0]}
    keys = {k: None for p in parts for k in p}  # the diagnostics come from the last micro-batch only
    metrics = {k: torch.stack([p[k] for p in parts if k in p]).mean(0) for k in keys}
    return {"loss": torch.stack(losses).sum(), "grad_norm": grad_norm, "num_inputs": num_inputs, "metrics": metrics}


def evaluate(stage, model, batches, rt: Runtime, dist: Dist = SINGLE) -> dict[str, float]:
    """Token-weighted loss, perplexity and accuracy over a fixed set of batches (shared out over ranks).

    A mixture's validation (exp.data.mixture.ValSets: batches per source) gives each source's as loss/<source>
    (perplexity/<source>, accuracy/<source>), and loss, perplexity and accuracy their means under its weights."""
    sets = getattr(batches, "sets", None)
    if sets is None:
        return _evaluate(stage, model, batches, rt, dist)
    each = {name: _evaluate(stage, model, b, rt, dist) for name, b in sets.items()}
    out = {k: sum(batches.weights[name] * m[k] for name, m in each.items()) for k in ("loss", "accuracy")}
    out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out | {f"{k}/{name}": v for name, m in each.items() for k, v in m.items()}


@torch.no_grad()
def _evaluate(stage, model, batches: Iterable, rt: Runtime, dist: Dist) -> dict[str, float]:
    was_training = model.training
    model.eval()
    batches = list(batches)
    shared = dist.enabled and len(batches) % dist.world_size == 0
    if shared:  # an even share each; otherwise every rank evaluates them all: FSDP forwards are collective
        batches = batches[dist.rank :: dist.world_size]  # and must stay in lockstep across ranks
    sums: dict[str, torch.Tensor] = {}  # each metric times its batch's weight (tokens; a DPO batch's pairs)
    weight = torch.zeros((), device=rt.device)
    for x, y in batches:
        with rt.autocast():
            out = stage.eval_step(model, (x.to(rt.device), y.to(rt.device)))
        n = out["num_tokens"].float()
        for key, value in out.items():
            if key != "num_tokens":
                sums[key] = sums.get(key, 0.0) + value.float() * n
        weight = weight + n
    model.train(was_training)
    totals = torch.stack([*sums.values(), weight])
    *values, weight = (dist.sum(totals) if shared else totals).tolist()
    means = {key: value / weight for key, value in zip(sums, values, strict=True)}
    if not getattr(stage, "eval_perplexity", True):  # a loss that is not a token-level cross-entropy (DPO's)
        return means
    return {"loss": means["loss"], "perplexity": math.exp(min(means["loss"], 50.0)), **means}


class _Interval:
    """One log interval's steps: sums of their losses, norms, inputs and seconds; the stage metrics stay on the
    device, one tensor per step, until the interval is read."""

    def __init__(self):
        self.num_steps, self.loss, self.grad_norm, self.num_inputs, self.seconds = 0, 0.0, 0.0, 0, 0.0
        self.steps: list[dict[str, torch.Tensor]] = []

    def add(self, loss: float, grad_norm: float, num_inputs: int, metrics: dict[str, torch.Tensor], seconds: float):
        self.num_steps += 1
        self.loss += loss
        self.grad_norm += grad_norm
        self.num_inputs += num_inputs
        self.seconds += seconds
        if metrics:
            self.steps.append(metrics)

    def means(self) -> dict[str, float]:
        """Stage metrics averaged over the interval; a vector (expert usage) becomes one key per entry."""
        out = {}
        keys = {k: None for m in self.steps for k in m}  # in order; a key may be missing from some steps
        for key in keys:
            value = torch.stack([m[key] for m in self.steps if key in m]).float().mean(0)
            if value.ndim:
                out.update({f"train/{key}_{i}": v for i, v in enumerate(value.tolist())})
            else:
                out[f"train/{key}"] = value.item()
        return out


@dataclass
class Trained:
    """The objects one run trains and where: what the loop, the Checkpointer and the fault guard share."""

    stage: object  # an exp.stages.Stage: the recipe (num_steps, intervals, ...) and train_step/eval_step
    model: nn.Module  # as built: what checkpoints save and samples come from
    optimizer: torch.optim.Optimizer
    scheduler: object
    rt: Runtime
    scaler: torch.amp.GradScaler | None = None
    dist: Dist = field(default_factory=Dist)
    step_model: nn.Module | None = None  # what steps run through (DDP-wrapped, compiled); None: the model
    flops_per_token: float = 0.0  # training FLOPs per token (exp.model.protocol.flops_per_token): perf/mfu

    @property
    def stepped(self) -> nn.Module:
        return self.model if self.step_model is None else self.step_model


def train(
    t: Trained,
    batches: Iterator,
    val_batches: list,
    events: Events | Iterable[Callback],
    state: TrainState,
    guard=None,
) -> TrainState:
    """Run optimizer steps from state.step to the stage's num_steps, logging and evaluating on its intervals.

    Only the steps are timed (train_seconds, tokens/s): evaluation and the callbacks' work are not training.
    """
    events = events if isinstance(events, Events) else Events(list(events))
    guard, stage = guard or FailFast(), t.stage
    if state.step == 0 and getattr(stage, "eval_at_start", False):
        val = evaluate(stage, t.stepped, val_batches, t.rt, t.dist)
        state.initial_val_loss = val["loss"]
        events.on_eval_end(state, {f"val/{k}": v for k, v in val.items()})
    interval, first_step = _Interval(), True
    while state.step < stage.num_steps:
        closes_interval = (state.step + 1) % stage.log_every_n_steps == 0 or state.step + 1 == stage.num_steps
        started = time.perf_counter()
        step = _step(t, batches, state, guard, diagnostics=closes_interval)
        if step is None:  # the guard skipped it
            continue
        seconds = time.perf_counter() - started
        loss, grad_norm, lr, out = step
        num_inputs = out["num_inputs"] * t.dist.world_size
        state.step += 1
        state.tokens_seen += num_inputs
        state.train_seconds += seconds  # per step, so a run stopped mid-interval keeps its tokens' time
        if first_step:  # compilation and warm-up: left out of the steady-state throughput
            first_step = False
            state.warmup_seconds += seconds
            state.warmup_tokens += num_inputs
        state.loss_ema = loss if state.loss_ema is None else EMA_BETA * state.loss_ema + (1 - EMA_BETA) * loss
        interval.add(loss, grad_norm, out["num_inputs"], out["metrics"], seconds)
        if closes_interval:
            metrics = _interval_metrics(interval, state, lr, t) | data_metrics(batches)
            state.train_loss = metrics["train/loss"]
            events.on_log(state, metrics)
            interval = _Interval()
        if state.step % stage.eval_every_n_steps == 0 or state.step == stage.num_steps:
            val = evaluate(stage, t.stepped, val_batches, t.rt, t.dist)
            state.val_loss = val["loss"]
            if val["loss"] < state.best_val_loss:
                state.best_val_loss, state.best_step = val["loss"], state.step
            events.on_eval_end(state, {f"val/{k}": v for k, v in val.items()})
        events.on_step_end(state, loss)
        stop, save = t.dist.any_each(events.should_stop, events.save_requested)  # every rank at the same step
        if save:
            events.on_save_request(state)
        if stop:
            break
    return state


def _step(t: Trained, batches: Iterator, state: TrainState, guard, diagnostics: bool):
    """One optimizer step: (loss, grad norm, the lr it ran at, train_step's output), or None when skipped."""
    t.optimizer.zero_grad(set_to_none=True)
    out = train_step(t.stage, t.stepped, t.optimizer, batches, t.rt, t.scaler, diagnostics=diagnostics)
    loss, grad_norm = _read_back(out["loss"], out["grad_norm"])
    # with fp16 loss scaling an inf gradient is routine: the scaler skips that update and lowers its scale
    finite = math.isfinite(loss) and (t.scaler is not None or math.isfinite(grad_norm))
    if guard.should_skip(state, loss, grad_norm, finite):
        t.optimizer.zero_grad(set_to_none=True)
        return None
    lr = t.optimizer.param_groups[0]["lr"]
    if t.scaler is not None:
        t.scaler.step(t.optimizer)  # skips the update itself when fp16 gradients overflowed
        t.scaler.update()
    else:
        t.optimizer.step()
    t.scheduler.step()
    return loss, grad_norm, lr, out


def _read_back(loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float]:
    """Both values on the host: one transfer from an accelerator; on the CPU two reads are cheaper than a stack."""
    if loss.device.type == "cpu" and grad_norm.device.type == "cpu":
        return loss.item(), grad_norm.item()
    return tuple(torch.stack([loss.float(), grad_norm.float()]).tolist())


def _interval_metrics(interval: _Interval, state: TrainState, lr: float, t: Trained) -> dict[str, float]:
    n, seconds, dist = interval.num_steps, max(interval.seconds, 1e-9), t.dist
    samples_per_step = t.stage.batch_size_per_gpu * t.stage.gradient_accumulation_steps
    loss_sum, inputs = interval.loss, interval.num_inputs
    if dist.enabled:
        loss_sum, inputs = dist.sum(torch.tensor([loss_sum, float(inputs)])).tolist()
    mean_loss = loss_sum / (n * dist.world_size)
    return {
        "train/loss": mean_loss,
        "train/loss_ema": state.loss_ema,
        "train/perplexity": math.exp(min(mean_loss, 50.0)),
        **interval.means(),
        "train/grad_norm": interval.grad_norm / n,
        "train/lr": lr,
        "perf/tokens_per_s": inputs / seconds,  # all ranks together
        **_utilisation(t, inputs / seconds),
        "perf/tokens_per_s_per_rank": interval.num_inputs / seconds,
        "perf/samples_per_s": n * samples_per_step * dist.world_size / seconds,
        "perf/step_ms": 1000 * seconds / n,
        "perf/peak_memory_mb": t.rt.peak_memory_mb(),
        "progress/tokens_seen": state.tokens_seen,
        **_epoch(state, t, interval.num_inputs / (n * samples_per_step)),
    }


def _utilisation(t: Trained, tokens_per_s: float) -> dict[str, float]:
    """perf/tflops (achieved model TFLOP/s per device) and perf/mfu (over its peak; exp.perf) when known."""
    if not t.flops_per_token:
        return {}
    out = {"perf/tflops": t.flops_per_token * tokens_per_s / t.dist.world_size / 1e12}
    utilisation = mfu(t.flops_per_token, tokens_per_s, t.rt.peak_flops, t.dist.world_size)
    return out | ({"perf/mfu": utilisation} if utilisation is not None else {})


def data_metrics(batches) -> dict[str, float]:
    """What the train sampler reports of itself (a mixture: data/tokens/<source>, data/weight/<source>); the same on
    every rank, as they share one stream."""
    return batches.metrics() if hasattr(batches, "metrics") else {}


def _epoch(state: TrainState, t: Trained, inputs_per_sample: float) -> dict[str, float]:
    """progress/epoch: passes over the training data so far, when the data knows its size (run.build sets it);
    from the samples all ranks consumed, which stays true when a resume changed the ranks or the global batch."""
    size = getattr(t.stage, "epoch_size", None)
    return {"progress/epoch": state.tokens_seen / inputs_per_sample / size} if size else {}
