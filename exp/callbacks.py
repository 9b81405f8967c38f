"""Small callbacks every run uses: the console log, the progress bar and the first-step clock."""

from __future__ import annotations

import logging
import sys
import time

from exp.loop import Callback, TrainState

log = logging.getLogger("exp")


class ConsoleLog(Callback):
    """One log line per log interval and per evaluation (also written to the run's train.log)."""

    EXTRA = (
        "train/kd_loss",
        "train/ce_loss",
        "train/teacher_agreement",
        "train/router_loss",
        "train/rewards/accuracies",
    )
    EXTRA += ("train/rewards/margins",)  # a DPO stage's

    def __init__(self, num_steps: int, show_epoch: bool = False):
        self.num_steps, self.show_epoch = num_steps, show_epoch  # the epoch: when the run counts in epochs
        self.width = len(str(num_steps))

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        accuracy = metrics.get("train/accuracy", metrics.get("train/student_accuracy"))
        extra = "".join(f" | {k[6:]} {metrics[k]:.4f}" for k in self.EXTRA if k in metrics)
        log.info(
            f"step {state.step:>{self.width}}/{self.num_steps} | loss {metrics['train/loss']:.4f} "
            f"(ema {metrics['train/loss_ema']:.4f}){extra}"
            + (f" | acc {accuracy:.3f}" if accuracy is not None else "")
            + f" | grad {metrics['train/grad_norm']:.3f} | lr {metrics['train/lr']:.2e} "
            f"| {metrics['perf/tokens_per_s']:,.0f} tok/s"
            + (f" | mfu {100 * metrics['perf/mfu']:.1f}%" if "perf/mfu" in metrics else "")
            + (f" | epoch {metrics['progress/epoch']:.2f}" if self.show_epoch and "progress/epoch" in metrics else "")
        )

    DPO = ("val/rewards/accuracies", "val/rewards/margins", "val/chosen_nll")  # a DPO stage's, after its loss

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        sources = [f"{k[9:]} {v:.4f}" for k, v in metrics.items() if k.startswith("val/loss/")]  # a mixture's
        log.info(
            f"eval {state.step:>{self.width}}/{self.num_steps} | val loss {metrics['val/loss']:.4f} "
            + (f"({', '.join(sources)}) " if sources else "")
            + (f"| ppl {metrics['val/perplexity']:.2f} " if "val/perplexity" in metrics else "")
            + (f"| acc {metrics['val/accuracy']:.3f}" if "val/accuracy" in metrics else "")
            + "".join(f"| {k[4:]} {metrics[k]:.3f} " for k in self.DPO if k in metrics).rstrip()
        )

    def on_task_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        tasks: dict[str, list[str]] = {}
        for key, value in metrics.items():
            if key.count("/") < 2:
                continue
            _, task, metric = key.split("/", 2)
            if not metric.endswith("_stderr"):
                tasks.setdefault(task, []).append(f"{metric} {value:.4g}")
        for task, values in tasks.items():
            log.info(f"tasks {state.step:>{self.width}}/{self.num_steps} | {task} | " + " | ".join(values))


class ProgressBar(Callback):
    """A live tqdm bar on an interactive terminal; nothing in batch logs, where the log lines suffice."""

    def __init__(self, num_steps: int, enabled: bool | None = None):
        self.num_steps = num_steps
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = self._redirect = None

    def on_train_start(self, state: TrainState) -> None:
        if self.enabled:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()  # log lines print above the bar instead of through it
            self._redirect.__enter__()
            self.bar = tqdm(total=self.num_steps, initial=state.step, unit="step", dynamic_ncols=True, leave=False)

    def on_step_end(self, state: TrainState, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", refresh=False)

    def on_train_end(self, state: TrainState, status: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)


class FirstStepClock(Callback):
    """Wall-clock time (Unix seconds) at which the first optimizer step of this process finished."""

    def __init__(self):
        self.first_step_time: float | None = None

    def on_step_end(self, state: TrainState, loss: float) -> None:
        if self.first_step_time is None:
            self.first_step_time = time.time()
