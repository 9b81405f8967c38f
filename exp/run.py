"""Build everything one run needs from the composed config, in order, and run the loop."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from exp import config, hardware, loop
from exp.callbacks import ConsoleLog, FirstStepClock, MetricsFile, ProgressBar
from exp.optim import build_optimizer

log = logging.getLogger("exp")


def train(cfg: DictConfig) -> float:
    """Validate, build, train, evaluate, sample and summarise one run; return the final validation loss."""
    config.job_started()
    try:
        valid = config.validate(cfg)
    except config.ConfigError as e:
        config.exit_on_config_error(e, run_dir=OmegaConf.select(cfg, "run_dir", throw_on_resolution_failure=False))
    stage, run = valid.stage, valid.run
    if run.dry_run:
        from exp.plan import format_plan, make_plan

        print(format_plan(make_plan(cfg, stage, valid.hardware)))
        config.discard_untouched_run_dir(run.run_dir)
        return float("nan")

    started = time.perf_counter()
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = instantiate(cfg.tracking)(cfg=cfg, run_dir=run_dir)
    state = loop.TrainState()
    tracker.on_train_start(state)  # MLflow imports and connects on its own thread while the rest is built
    clock = FirstStepClock()
    callbacks = [
        clock,
        ConsoleLog(stage.num_steps),
        MetricsFile(run_dir / "metrics.jsonl"),
        ProgressBar(stage.num_steps),
        tracker,
    ]
    status = "FAILED"
    try:
        rt = hardware.setup(valid.hardware, stage.dtype)
        seed_everything(run.seed)
        data = instantiate(cfg.data)
        model = instantiate(cfg.model).to(rt.device)
        optimizer = build_optimizer(instantiate(cfg.optimizer), model, device=rt.device)
        scheduler = instantiate(cfg.scheduler)(optimizer)
        batches = data.train_sampler(stage.batch_size_per_gpu, seed=run.seed)
        val_batches = [
            (x.to(rt.device), y.to(rt.device))
            for x, y in data.val_batches(stage.batch_size_per_gpu, stage.num_eval_batches)
        ]
        step_model = torch.compile(model) if rt.compile else model
        log.info(
            f"run dir {run_dir} | {model.num_params():,} parameters | {rt.device} {rt.dtype} "
            f"| {stage.num_steps} steps of {stage.samples_per_step} x {cfg.data.seq_len} tokens"
        )

        for cb in callbacks:
            if cb is not tracker:
                cb.on_train_start(state)
        state = loop.train(
            stage,
            step_model,
            optimizer,
            scheduler,
            batches,
            val_batches,
            rt,
            callbacks,
            state,
            scaler=rt.grad_scaler(),
        )
        sample = generate_sample(model, run.sample, data.vocab_size, rt)
        if sample is not None:
            log.info(f"sample:\n{run.sample.prompt}{sample}")
        summary = write_summary(
            run_dir,
            state,
            stage,
            model,
            tracker,
            sample,
            time.perf_counter() - started,
            first_step_time=clock.first_step_time,
        )
        tracker.log_artifact(run_dir / "summary.json")
        tracker.log_artifact(run_dir / "metrics.jsonl")
        if (run_dir / ".hydra").is_dir():
            for path in sorted((run_dir / ".hydra").iterdir()):
                tracker.log_artifact(path, "hydra")
        log.info(
            f"done: val loss {summary['val_loss']:.4f} | {summary['tokens_per_s']:,.0f} tok/s "
            f"| summary {run_dir / 'summary.json'}"
        )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except loop.NonFiniteLoss as e:
        log.error(str(e))
        raise SystemExit(1) from None
    finally:
        for cb in callbacks:
            cb.on_train_end(state, status)
    return state.val_loss


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def generate_sample(model, sample, vocab_size: int, rt: hardware.Runtime) -> str | None:
    """Text continued from sample.prompt by the trained model; None when the data has no byte tokenizer."""
    from exp.data.tokenizer import VOCAB_SIZE, ByteTokenizer

    if sample.max_new_tokens == 0 or vocab_size != VOCAB_SIZE:
        return None
    tokenizer = ByteTokenizer()
    prompt = torch.tensor([tokenizer.encode(sample.prompt) or [tokenizer.specials["<|endoftext|>"]]], device=rt.device)
    generator = torch.Generator(rt.device).manual_seed(0)
    model.eval()
    with rt.autocast():
        out = model.generate(
            prompt,
            sample.max_new_tokens,
            temperature=sample.temperature,
            top_k=sample.top_k,
            generator=generator,
        )
    model.train()
    return tokenizer.decode(out[0, prompt.size(1) :].tolist())


def write_summary(
    run_dir: Path,
    state: loop.TrainState,
    stage,
    model,
    tracker,
    sample: str | None,
    wall_seconds: float,
    first_step_time: float | None = None,
) -> dict:
    """summary.json: final metrics and where to find the run's record, written atomically."""
    summary = {
        "status": "FINISHED",
        "stage": stage.name,
        "step": state.step,
        "num_steps": stage.num_steps,
        "tokens_seen": state.tokens_seen,
        "train_loss": state.train_loss,
        "val_loss": state.val_loss,
        "best_val_loss": state.best_val_loss,
        "val_perplexity": float(np.exp(min(state.val_loss, 50.0))) if state.val_loss is not None else None,
        "tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
        "train_seconds": state.train_seconds,
        "wall_seconds": wall_seconds,
        "first_step_time": first_step_time,  # Unix time the first step finished: startup cost, for benchmarks
        "num_params": model.num_params(),
        "run_dir": str(run_dir.resolve()),
        "mlflow_tracking_uri": tracker.uri,
        "mlflow_run_id": tracker.run_id,
        "sample": sample,
    }
    tmp = run_dir / f".summary.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run_dir / "summary.json")
    return summary
