"""Downstream evaluation inside a run: every eval.every_n_steps steps and at the end, on every rank, the results
reported on rank 0 (on_task_eval: metrics.jsonl, MLflow, the console) and kept under the run dir's eval/ folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from exp.eval import harness
from exp.events import Callback, Events, TrainState
from exp.rundir import write_atomic

log = logging.getLogger("exp")

EVAL_DIR = "eval"  # in the run dir: step_<N>.json, the harness's results of each evaluation


def results_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / f"step_{step:08d}.json"


def write_results(run_dir: Path, step: int, results: dict) -> Path:
    """The harness's results of the evaluation at `step`, written atomically into RUN_DIR/eval/."""
    path = results_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, harness.results_json(results))


class TaskEval(Callback):
    """Runs the `eval` config's tasks on the model being trained (exp.eval.adapter.ExpLM, no copy of the weights).

    Evaluation time is not training time (the loop times only its steps). `last` holds the newest scores, for
    summary.json; `at_end` evaluates the final model unless the last step was just evaluated.
    """

    def __init__(self, cfg, trained, tokenizer, events: Events, run_dir: Path, tracker=None):
        self.cfg, self.spec = cfg, cfg.spec()
        self.trained, self.tokenizer, self.events, self.run_dir = trained, tokenizer, events, Path(run_dir)
        self.tracker = tracker
        self.manager = None
        self.last: dict[str, float] = {}
        self.last_step: int | None = None

    def on_step_end(self, state: TrainState, loss: float) -> None:
        every = self.cfg.every_n_steps
        if every and state.step % every == 0 and state.step < self.trained.stage.num_steps:
            self.evaluate(state)

    def at_end(self, state: TrainState) -> None:
        if self.cfg.at_end and self.last_step != state.step:
            self.evaluate(state)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        from exp.eval.adapter import ExpLM

        t = self.trained
        fsdp = t.dist.enabled and t.dist.strategy == "fsdp"  # sharded: forwards through the FSDP module, in step
        started = time.perf_counter()
        lm = ExpLM(
            t.model,
            self.tokenizer,
            batch_size=self.spec.batch_size,
            autocast=t.rt.autocast,
            dist=t.dist,
            max_gen_toks=self.spec.max_gen_toks,
            seed=self.spec.seed,
            collective=fsdp,
        )
        self.manager = self.manager or harness.check_tasks(self.spec)
        self.last_step = state.step
        try:  # the same requests on every rank: an error is raised on every rank alike
            results = harness.run(lm, self.spec, self.manager)
        except (ValueError, RuntimeError, KeyError) as e:  # a task the model cannot score: training goes on
            log.error(f"evaluation at step {state.step} failed, training goes on: {type(e).__name__}: {e}")
            return {}
        if not t.dist.is_main or results is None:
            return {}
        metrics = harness.metrics_of(results)
        metrics["perf/eval_seconds"] = time.perf_counter() - started
        self.last = metrics
        path = write_results(self.run_dir, state.step, results)
        self.events.on_task_eval(state, metrics)
        if self.tracker is not None:
            self.tracker.log_artifact(path, EVAL_DIR)
        return metrics
