"""The loop alone: exp.loop.train against a bare PyTorch loop in one process, alternating chunks of steps.

bench_loop.py compares whole processes, so its figures include what differs between two runs of a program
on this machine (memory layout, the host's neighbours): a few percent from round to round. Here both sides
live in one interpreter, built from the same composed config, and take turns (bare, exp, bare, exp, ...)
in chunks of steps, so that drift falls on both alike and the per-chunk ratios can be many:

    bare   the step of bench/bare_loop.py: sample, zero_grad, forward with the loss inside the model,
           backward, clip, read the loss, AdamW step, LR schedule step
    exp    exp.loop.train with what a run adds around it: the stage's train_step (loss outside the model,
           accuracy on each log step), the fault guard, the console log (to a file), metrics.jsonl,
           the first-step clock, early stopping, and a checkpointer that saves only at the end

Each side trains its own copy of the same initial weights on the same batches, so their losses must
agree; the chunk time is taken between step-end stamps, leaving out the end-of-chunk evaluation.

    python bench/bench_loop_ab.py               # both configurations, about 2 minutes
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bare_loop import BareLoop  # noqa: E402  (bench/ is on sys.path when run as a script)
from bench_loop import CONFIGS, TARGET_STEP_OVERHEAD_MS, TARGET_TPS_RATIO  # noqa: E402

from exp.loop import Callback  # noqa: E402

CHUNKS = {"tiny-small": (200, 30), "gpt_tiny": (20, 15)}  # steps per chunk, rounds


def build(config, num_steps: int, work: Path):
    """The validated config, model, data and schedule settings from the framework's composed config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    from exp.config import component, validate

    overrides = [
        *config.overrides,
        "hardware=cpu",
        f"stage.num_steps={num_steps}",
        f"stage.log_every_n_steps={config.log_every}",  # as in bench_loop.py
        "tracking=none",
        f"run_dir={work}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # run_name reads ${hydra:runtime.choices.*}, as under @hydra.main
    with open_dict(cfg):
        del cfg["hydra"]
    valid = validate(cfg)
    data = instantiate(cfg.data)
    train_bin, _ = data.files()
    torch.manual_seed(cfg.seed)
    model = instantiate(component(cfg, "model"))
    scheduler = OmegaConf.to_container(cfg.scheduler, resolve=True)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    return valid, model, data, np.memmap(train_bin, dtype=np.uint16, mode="r"), scheduler, optimizer, cfg


class Framework:
    """exp.loop.train with a run's callbacks, a chunk at a time (the stage's num_steps moves with the chunk)."""

    def __init__(self, model, data, valid, cfg, work: Path):
        from hydra.utils import instantiate

        from exp import hardware, loop
        from exp.callbacks import ConsoleLog, FirstStepClock
        from exp.checkpoint import Checkpointer
        from exp.config import component
        from exp.faults import EarlyStopping, FaultGuard, StopSignals
        from exp.optim import build_optimizer
        from exp.rundir import MetricsFile

        stage, run = valid.stage, valid.run
        self.loop, self.model, self.stage = loop, model, stage
        self.rt = hardware.Runtime(device=torch.device("cpu"), dtype=torch.float32)
        self.opt = build_optimizer(instantiate(component(cfg, "optimizer")), model, device=self.rt.device)
        self.sched = instantiate(cfg.scheduler)(self.opt)
        self.batches = data.train_sampler(stage.batch_size_per_gpu, seed=cfg.seed)
        self.val = data.val_batches(stage.batch_size_per_gpu, 1)
        self.guard = FaultGuard(run.nan, rollback=lambda st, f: False, on_event=lambda st, m: None)
        self.stamps = Stamps()
        self.callbacks = [
            FirstStepClock(),
            StopSignals(),
            EarlyStopping(run.early_stopping),
            Checkpointer(every_n_steps=0, keep_last=1, keep_best=False, dir=str(work / "checkpoints")),  # never saves
            ConsoleLog(stage.num_steps),
            MetricsFile(work / "metrics.jsonl"),
            self.stamps,
        ]
        self.state = loop.TrainState()
        self.losses = self.stamps.losses
        for cb in self.callbacks:
            cb.on_train_start(self.state)

    def run(self, steps: int) -> list[float]:
        self.stamps.stamps = []
        stage = copy.copy(self.stage)
        stage.num_steps = self.state.step + steps
        trained = self.loop.Trained(stage, self.model, self.opt, self.sched, self.rt)
        self.loop.train(trained, self.batches, self.val, self.callbacks, self.state, guard=self.guard)
        return self.stamps.stamps


class Stamps(Callback):
    """The time and loss of every step's end."""

    def __init__(self):
        self.stamps: list[float] = []
        self.losses: list[float] = []

    def on_step_end(self, state, loss: float) -> None:
        self.stamps.append(time.perf_counter())
        self.losses.append(loss)


def chunk_ms(stamps: list[float]) -> float:
    """Mean step time between the first and the second-to-last step end: the last step evaluates (exp)."""
    return 1000 * (stamps[-2] - stamps[0]) / (len(stamps) - 2)


def bench(config, work: Path) -> dict:
    steps, rounds = CHUNKS[config.name]
    total = steps * (rounds + 1)
    valid, model, data, tokens, sched, opt, cfg = build(config, total, work)
    stage = valid.stage
    bare = BareLoop(
        copy.deepcopy(model), tokens, batch_size=stage.batch_size_per_gpu, num_steps=total, lr=opt["lr"],
        betas=opt["betas"], eps=opt["eps"], weight_decay=opt["weight_decay"], warmup_steps=sched["warmup_steps"],
        warmup_ratio=sched["warmup_ratio"], lr_decay_ratio=sched["lr_decay_ratio"],
        max_grad_norm=stage.max_grad_norm, seed=cfg.seed,
    )  # fmt: skip
    fw = Framework(copy.deepcopy(model), data, valid, cfg, work)
    bare.run(steps), fw.run(steps)  # warm-up chunk, not counted
    pairs = []
    for rnd in range(rounds):
        first, second = (bare, fw) if rnd % 2 == 0 else (fw, bare)  # alternate who goes first
        times = {id(first): chunk_ms(first.run(steps)), id(second): chunk_ms(second.run(steps))}
        pairs.append((times[id(bare)], times[id(fw)]))
    n = min(len(bare.losses), len(fw.losses))
    max_loss_diff = max(abs(a - b) for a, b in zip(bare.losses[:n], fw.losses[:n], strict=True))
    tokens_per_step = stage.batch_size_per_gpu * model.seq_len
    return {
        "bare_ms": statistics.median(b for b, _ in pairs),
        "fw_ms": statistics.median(f for _, f in pairs),
        "overhead_ms": [f - b for b, f in pairs],
        "ratio": [b / f for b, f in pairs],  # tokens/s exp over bare
        "tokens_per_step": tokens_per_step,
        "max_loss_diff": max_loss_diff,
        "steps": n,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("EXP_CACHE_DIR", str(Path.home() / ".cache" / "exp"))
    with tempfile.TemporaryDirectory(prefix="bench_loop_ab-") as tmp:
        logging.basicConfig(filename=Path(tmp) / "train.log", level=logging.INFO)  # the console log's lines go here
        for config in CONFIGS:
            work = Path(tmp) / config.name
            work.mkdir()
            r = bench(config, work)
            over, ratio = r["overhead_ms"], r["ratio"]
            q = statistics.quantiles
            print(f"== {config.name}: {config.description}")
            print(
                f"   {len(over)} pairs of {CHUNKS[config.name][0]}-step chunks, log every {config.log_every}, "
                f"torch threads {args.threads}; "
                f"median [quartiles]"
            )
            print(f"   bare {r['bare_ms']:.3f} ms/step, exp {r['fw_ms']:.3f} ms/step")
            lo, _, hi = q(over, n=4)
            mark = "ok" if statistics.median(over) <= TARGET_STEP_OVERHEAD_MS else "MISS"
            print(
                f"   exp - bare per step   {statistics.median(over):+.3f} ms [{lo:+.3f}..{hi:+.3f}] "
                f"{mark} (target <= {TARGET_STEP_OVERHEAD_MS})"
            )
            lo, _, hi = q(ratio, n=4)
            mark = "ok" if statistics.median(ratio) >= TARGET_TPS_RATIO else "MISS"
            print(
                f"   exp / bare tokens/s   {statistics.median(ratio):.4f} [{lo:.4f}..{hi:.4f}] "
                + (f"{mark} (target >= {TARGET_TPS_RATIO})" if config.tps_target else "")
            )
            same = "equal" if r["max_loss_diff"] == 0 else f"differ by up to {r['max_loss_diff']:.2e}"
            print(f"   losses over {r['steps']} steps: {same}\n")
            if not math.isfinite(r["max_loss_diff"]):
                raise SystemExit("bench_loop_ab: a loss was not finite")


if __name__ == "__main__":
    main()
