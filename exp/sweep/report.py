"""Plots and reports of runs, sweeps and MLflow experiments: `python -m exp.report SWEEP_DIR|RUN_DIR|EXPERIMENT`."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from exp.errors import ExpError
from exp.rundir import plot_run, pyplot, read_metrics, read_summary, task_metrics
from exp.sweep.manifest import SweepError, is_sweep_dir, load_sweep, trials_of
from exp.text import first_line, fmt_loss

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
MAX_LEGEND = 15  # more curves than this are drawn but left out of the legend
# MLflow params that differ between any two runs without saying anything about what was tried
RUN_SPECIFIC_PARAMS = ("run_dir", "checkpoint.dir", "tracking.parent_run_id", "tracking.run_id", "resume.path")


class ReportError(ExpError):
    """What to report cannot be found; the message is the one line the user sees."""

    exit_code = 2


# --- trials -----------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One point of a sweep (or one run of an experiment) as the report shows it."""

    num: str
    params: dict[str, str]
    status: str
    train_loss: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    tokens_per_s: float | None = None
    error: str | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # eval=lm_eval: the last value of each task metric
    # an Optuna study's own objective, when it is one metric other than val/loss: what the trials are ranked by
    objective: float | None = None
    maximize: bool = False

    @property
    def rank_value(self) -> float | None:
        return self.objective if self.objective is not None else self.val_loss

    @property
    def ranked(self) -> bool:
        return self.status == "FINISHED" and _finite(self.rank_value)


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """Hydra overrides as key -> value (`+`/`++` dropped from the key; a deletion `~key` has value `~`)."""
    params = {}
    for override in overrides:
        key, _, value = override.partition("=")
        params[key.lstrip("+")] = "~" if key.startswith("~") and not value else value
    return params


def varying_keys(trials: list[Trial]) -> list[str]:
    """Keys whose value differs between trials (absent counts as a value), in first-seen order."""
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    return [k for k in keys if len({t.params.get(k) for t in trials}) > 1]


def rank(trials: list[Trial]) -> list[Trial]:
    """FINISHED trials by final val loss (or by the study's objective, in its direction), then the failed and
    unfinished ones in job order."""
    done = sorted((t for t in trials if t.ranked), key=lambda t: -t.rank_value if t.maximize else t.rank_value)
    rest = sorted((t for t in trials if not t.ranked), key=lambda t: _num_key(t.num))
    return done + rest


def numeric_keys(trials: list[Trial], keys: list[str]) -> list[str]:
    """The keys whose every present value is a number."""
    out = []
    for key in keys:
        values = [t.params[key] for t in trials if key in t.params]
        if values and all(_number(v) is not None for v in values):
            out.append(key)
    return out


def sweep_trials(sweep_dir: Path) -> tuple[list[Trial], bool]:
    """(trials, is_optuna) of a sweep dir, each refreshed from its run dir's summary.json and metrics.jsonl."""
    manifest = load_sweep(sweep_dir)
    trials = []
    for entry in trials_of(manifest):
        summary = read_summary(Path(entry["run_dir"])) or {}
        rows = read_metrics(Path(entry["run_dir"]) / "metrics.jsonl")
        val = [(m["step"], m["val/loss"]) for m in rows if "val/loss" in m]
        train = [m["train/loss"] for m in rows if "train/loss" in m]
        speed = [m["perf/tokens_per_s"] for m in rows if "perf/tokens_per_s" in m]
        finite_val = [v for _, v in val if _finite(v)]
        trials.append(
            Trial(
                num=str(entry["num"]),
                params=parse_overrides(entry.get("overrides", [])),
                status=entry.get("status") or "PENDING",
                # a failed run's summary has no train loss or speed: the last logged ones stand in
                train_loss=summary.get("train_loss", train[-1] if train else None),
                val_loss=entry.get("val_loss"),
                best_val_loss=summary.get("best_val_loss", min(finite_val) if finite_val else None),
                tokens_per_s=entry.get("tokens_per_s") or (speed[-1] if speed else None),
                error=entry.get("error"),
                curve=val,
                scores={name: points[-1][1] for name, points in task_metrics(rows).items()},
            )
        )
        trials[-1].objective, trials[-1].maximize = study_objective(manifest.get("study") or {}, rows)
    return trials, (Path(sweep_dir) / "optimization_results.yaml").exists() or bool(manifest.get("study"))


def study_objective(study: dict, rows: list[dict]) -> tuple[float | None, bool]:
    """(the trial's last value of the study's objective, whether it is maximised) when the study optimised one
    metric other than val/loss; (None, False) otherwise (ranked by val loss)."""
    names, direction = study.get("objective") or ["val/loss"], study.get("direction") or "minimize"
    if len(names) != 1 or names[0] == "val/loss" or not isinstance(direction, str):
        return None, False
    values = [r[names[0]] for r in rows if isinstance(r.get(names[0]), (int, float)) and _finite(r[names[0]])]
    return (values[-1] if values else None), direction == "maximize"


# Optuna's own plots of a study (matplotlib), written beside report.png: file name -> plot function
STUDY_PLOTS = {
    "optuna_history.png": "plot_optimization_history",
    "optuna_intermediate.png": "plot_intermediate_values",
    "optuna_parallel.png": "plot_parallel_coordinate",
    "optuna_importances.png": "plot_param_importances",
}


def study_plots(sweep_dir: Path, out_dir: Path) -> list[Path]:
    """Optuna's plots of the sweep's study (exp.sweep.optuna) into out_dir; the files written. A plot the study
    cannot have yet (parameter importances before two trials completed) is left out with one line."""
    manifest = load_sweep(sweep_dir, write=False)
    study_info = manifest.get("study")
    if not study_info:
        return []
    import warnings

    import optuna
    import optuna.visualization.matplotlib as plots

    from exp.sweep.pruning import open_storage

    plt = pyplot()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=study_info["study_name"], storage=open_storage(study_info["storage"]))
    objectives = study.user_attrs.get("objectives") or ["val/loss"]
    multi = len(study.directions) > 1
    print_objectives(study, objectives)
    plots_of_study = {"optuna_pareto.png": "plot_pareto_front"} if multi else STUDY_PLOTS
    written = []
    for name, function in plots_of_study.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                names = {"target_names": objectives} if multi else {}
                ax = getattr(plots, function)(study, **names)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(max(fig.get_size_inches()[0], 10), max(fig.get_size_inches()[1], 5.5))
            fig.tight_layout()
            fig.savefig(Path(out_dir) / name, dpi=100)
            plt.close(fig)
            written.append(Path(out_dir) / name)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            print(f"{name}: not drawn ({first_line(e)})")
    return written


def print_objectives(study, objectives: list[str]) -> None:
    """What the study optimised and its result: the best trial, or the Pareto front of a multi-objective study."""
    from optuna.trial import TrialState

    directions = [d.name.lower() for d in study.directions]
    print("objective: " + ", ".join(f"{d} {n}" for n, d in zip(objectives, directions, strict=True)))
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return
    if len(directions) == 1:
        best = study.best_trial
        print(f"best: #{best.number} {objectives[0]} {best.value:.6g} {best.params}")
        return
    print(f"Pareto front ({len(study.best_trials)} trials):")
    for t in sorted(study.best_trials, key=lambda t: t.number):
        values = ", ".join(f"{n} {v:.6g}" for n, v in zip(objectives, t.values, strict=True))
        print(f"  #{t.number}: {values} {t.params}")


def experiment_trials(name: str, uri: str) -> list[Trial]:
    """The runs of an MLflow experiment (parent runs of sweeps and pipelines left out), with val/loss curves."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).exists():
        raise ReportError(f"{name}: no such directory, and no MLflow store at {uri[len(prefix) :]}")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server is one error, not minutes
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_experiment_by_name(name)
    except Exception as e:
        raise ReportError(f"MLflow at {uri}: {first_line(e)}") from None
    if experiment is None:
        raise ReportError(f"{name}: no such directory, and no MLflow experiment of that name at {uri}")
    runs = [
        r
        for r in client.search_runs([experiment.experiment_id], max_results=10000)
        if r.data.tags.get("kind") not in ("sweep", "pipeline")
    ]
    if not runs:
        raise ReportError(f"MLflow experiment {name} at {uri} has no runs")
    trials = []
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "val/loss")
        curve = sorted((m.step, m.value) for m in history)
        metrics = run.data.metrics
        summary = _run_dir_summary(run.data.tags.get("run_dir"))
        trials.append(
            Trial(
                num=run.info.run_name or run.info.run_id[:8],
                params={k: v for k, v in run.data.params.items() if not k.startswith(RUN_SPECIFIC_PARAMS)},
                status=run.data.tags.get("status", run.info.status),  # PRUNED: KILLED in MLflow, with a tag
                train_loss=metrics.get("train/loss"),
                val_loss=metrics.get("val/loss"),
                best_val_loss=min((v for _, v in curve if _finite(v)), default=None),
                tokens_per_s=metrics.get("perf/tokens_per_s"),
                error=summary.get("error"),
                curve=curve,
            )
        )
    if len({t.num for t in trials}) < len(trials):  # run names repeat (model-stage): short run ids instead
        for t, run in zip(trials, runs, strict=True):
            t.num = run.info.run_id[:8]
    return trials


def distinct_keys(trials: list[Trial], keys: list[str]) -> list[str]:
    """One key per way the values split the runs: keys that always vary together say the same thing."""
    # a group's keys (optimizer._target_, optimizer.betas, ...) or a value read through an interpolation
    # (optimizer.lr from stage.learning_rate); the group's _target_ or else the shortest key speaks for them
    by_split: dict[tuple, list[str]] = {}
    for key in keys:
        split = tuple(t.params.get(key) for t in trials)
        labels: dict = {}
        by_split.setdefault(tuple(labels.setdefault(v, len(labels)) for v in split), []).append(key)
    chosen = [min(group, key=lambda k: (not k.endswith("._target_"), len(k), k)) for group in by_split.values()]
    return [k for k in keys if k in chosen]


# --- output -----------------------------------------------------------------------------------------


def format_table(trials: list[Trial], keys: list[str]) -> str:
    """The ranked table: rank, trial, the varying keys, losses, the downstream scores (eval=lm_eval), speed and status
    (with the error's first line)."""
    scored = sorted({name for t in trials for name in t.scores})
    header = ["rank", "trial", *keys, "train loss", "val loss", "best val", *scored, "tokens/s", "status"]
    rows, position = [header], 0
    for t in rank(trials):
        position += t.ranked
        status = t.status + (f": {first_line(t.error)}" if t.error else "")
        rows.append(
            [
                str(position) if t.ranked else "-",
                t.num,
                *(_short_value(t.params.get(k, "")) for k in keys),
                fmt_loss(t.train_loss),
                fmt_loss(t.val_loss),
                fmt_loss(t.best_val_loss),
                *(f"{t.scores[n]:.4g}" if n in t.scores else "-" for n in scored),
                f"{t.tokens_per_s:,.0f}" if _finite(t.tokens_per_s) else "-",
                status,
            ]
        )
    numeric = {0, 1, *range(len(header) - 5 - len(scored), len(header) - 1)}
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))]
        lines.append("  ".join([*cells, r[-1]]))
    return "\n".join(lines)


def plot_sweep(trials: list[Trial], keys: list[str], out: Path, param_panels: list[str], title: str = "") -> list[str]:
    """Val-loss curves of every trial (best highlighted) and final val loss per `param_panels` key; the panels drawn."""
    plt = pyplot()
    ranked = rank(trials)
    best = ranked[0] if ranked and ranked[0].ranked else None
    short = short_keys(keys)
    n = len(param_panels)
    fig = plt.figure(figsize=(max(10, 4.2 * n), 9 if n else 5.5))
    # at least two columns, so that a single parameter panel is not stretched across the figure
    grid = fig.add_gridspec(2 if n else 1, max(n, 2), height_ratios=[1.3, 1] if n else None)
    ax = fig.add_subplot(grid[0, :])
    colors = plt.get_cmap("tab20" if len(trials) > 10 else "tab10")
    drawn, extra = ["val/loss"], []
    for i, t in enumerate(ranked):
        if not t.curve:
            continue
        label = f"#{t.num} " + (" ".join(f"{short[k]}={_short_value(t.params.get(k, ''))}" for k in keys) or "")
        if t.status != "FINISHED":
            label += f" ({t.status})"
        is_best = t is best
        if t.status == "PRUNED":  # where the pruner stopped it
            ax.plot(*t.curve[-1], "x", color=colors(i % colors.N), markersize=9, zorder=3, label="_nolegend_")
        ax.plot(
            *zip(*t.curve, strict=True),
            "-" if t.status == "FINISHED" else "--",
            marker="o" if len(t.curve) < 30 else None,
            markersize=3,
            color="black" if is_best else colors(i % colors.N),
            linewidth=2.8 if is_best else 1.3,
            alpha=1.0 if is_best else 0.85,
            zorder=10 if is_best else 2,
            label=("best " + label) if is_best else (label if i < MAX_LEGEND else "_nolegend_"),
        )
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    hidden = sum(1 for i, t in enumerate(ranked) if t.curve and i >= MAX_LEGEND and t is not best)
    if any(t.curve for t in trials):
        legend = ax.legend(
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            title=f"{hidden} more not listed" if hidden else None,
            title_fontsize=7,
        )
        legend.set_in_layout(False)  # the axes keep their size; the saved image widens to hold the legend
        extra.append(legend)
    if best is not None:
        title += f" | best #{best.num}: val loss {best.val_loss:.4f}"
    ax.set_title(title, fontsize=9)
    for j, key in enumerate(param_panels):
        pax = fig.add_subplot(grid[1, j])
        points = [(_number(t.params[key]), t.val_loss) for t in trials if t.ranked and key in t.params]
        if points:
            pax.scatter(*zip(*points, strict=True), s=22, color="tab:blue", alpha=0.8)
            xs = [x for x, _ in points]
            if min(xs) > 0 and max(xs) / min(xs) > 10:  # values spanning decades were searched on a log scale
                pax.set_xscale("log")
        if best is not None and key in best.params:
            pax.scatter([_number(best.params[key])], [best.val_loss], s=140, marker="*", color="tab:red", zorder=5)
        pax.set_xlabel(key, fontsize=8)
        pax.set_ylabel("final val loss", fontsize=8)
        pax.tick_params(labelsize=7)
        pax.grid(alpha=0.3)
        drawn.append(key)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight", bbox_extra_artists=extra)
    plt.close(fig)
    return drawn


def short_keys(keys: list[str]) -> dict[str, str]:
    """Legend names: learning_rate for stage.learning_rate where unambiguous, optimizer for optimizer._target_."""
    names = [k.removesuffix("._target_") if k.endswith("._target_") else k for k in keys]
    last = [n.rsplit(".", 1)[-1] for n in names]
    return {k: (s if last.count(s) == 1 else n) for k, n, s in zip(keys, names, last, strict=True)}


def report_trials(trials: list[Trial], keys: list[str], out: Path, optuna: bool, title: str) -> list[str]:
    """Print the table and write the PNG; the panels drawn."""
    numeric = numeric_keys(trials, keys)
    # Optuna searches numbers; a grid of only numbers is read the same way
    panels = numeric if optuna or (keys and numeric == keys) else []
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    print(f"{title}: {len(trials)} trials (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")
    print(format_table(trials, keys))
    drawn = plot_sweep(trials, keys, out, panels, title)
    print(f"report: {out}")
    return drawn


def report_run(run_dir: Path, out: Path | None) -> int:
    """Print a run's summary.json and write its plot."""
    summary = read_summary(run_dir) or {}
    width = max(map(len, summary))
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"
        elif isinstance(value, str) and "\n" in value:
            value = repr(value)
        print(f"{key:<{width}}  {value}")
    plot = plot_run(run_dir / "metrics.jsonl", out or run_dir / "metrics.png")
    print(f"plot: {plot}" if plot else "plot: none (nothing logged in metrics.jsonl)")
    return 0


# --- the CLI ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exp.report", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a sweep dir, a run dir, or an MLflow experiment name")
    parser.add_argument(
        "--tracking-uri", default=None, help=f"MLflow store (MLFLOW_TRACKING_URI, {DEFAULT_TRACKING_URI})"
    )
    parser.add_argument("--out", type=Path, default=None, help="the PNG to write")
    args = parser.parse_args(argv)
    path = Path(args.target)
    try:
        if path.is_dir() and is_sweep_dir(path):
            trials, optuna = sweep_trials(path)
            out = args.out or path / "report.png"
            report_trials(trials, varying_keys(trials), out, optuna, str(path))
            for plot in study_plots(path, Path(out).parent):
                print(f"study plot: {plot}")
            return 0
        if path.is_dir() and (path / "summary.json").exists():
            return report_run(path, args.out)
        if path.is_dir():
            raise ReportError(
                f"{path} is neither a sweep directory (sweep.json, or multirun.yaml and numbered run dirs) "
                "nor a run directory (summary.json)"
            )
        if path.exists():
            raise ReportError(f"{path} is not a directory")
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        trials = experiment_trials(args.target, uri)
        keys = distinct_keys(trials, varying_keys(trials))
        out = args.out or Path(f"report-{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.target)}.png")
        report_trials(trials, keys, out, optuna=False, title=f"MLflow experiment {args.target}")
        return 0
    except (ReportError, SweepError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# --- small helpers ----------------------------------------------------------------------------------


def _run_dir_summary(run_dir: str | None) -> dict:
    return (read_summary(run_dir) if run_dir else None) or {}


def _number(value) -> float | None:
    if isinstance(value, bool) or str(value).lower() in ("true", "false", "nan", "inf", "-inf"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _short_value(value: str) -> str:
    """Sampled floats (0.0022881136684755237) to 4 significant digits, a class (torch.optim.AdamW) by its name."""
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", str(value)):
        return str(value).rsplit(".", 1)[-1]
    number = _number(value)
    if number is None or re.fullmatch(r"-?\d+", str(value)):
        return str(value)
    return f"{number:.4g}"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _num_key(num: str):
    return (0, int(num), "") if str(num).isdigit() else (1, 0, str(num))
