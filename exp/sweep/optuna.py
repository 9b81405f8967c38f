"""exp's Optuna sweeper (`override hydra/sweeper: optuna`): an asynchronous, pruned, resumable study on Optuna >= 4.

- The search space is written as Hydra overrides (`interval`, `int`, `choice`, `range`, `a,b,c`, `tag(log, ...)`),
  parsed by Hydra's own override parser; values that are not sweeps are fixed for every trial.
- Asynchronous: up to `parallelism` trials in flight, each one job of the sweep's launcher (exp.sweep.launch:
  validated, in sweep.json, nested under the sweep's MLflow run); a trial is asked from the study the moment one
  ends. exp_basic runs trials one at a time in this process; exp_local and exp_slurm submit each as its own job.
- Pruning: every trial reports its evaluations to the study (exp.sweep.pruning.OptunaPruning, attached as
  `callbacks.optuna`); a pruned trial ends PRUNED after a checkpoint.
- Persistent: the study lives in storage in the sweep dir (SQLite, or a journal file), so the same command with
  the same hydra.sweep.dir (`python -m exp.sweep resume DIR`) continues it: ended trials are kept, trials that were
  in flight are waited for when their job still runs and otherwise rerun from their checkpoints, numbering goes
  on, and n_trials counts the whole study.
- Failures: a trial that raises or ends FAILED is FAIL in the study and the search goes on, until more than
  max_failure_rate x n_trials have failed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from exp.rundir import RunDirInUse, RunLock, lock_holder, read_summary, write_json
from exp.sweep import objective
from exp.sweep.jobs import checkpoints_of, fresh_summary, slurm_states
from exp.sweep.launch import SlurmSweep, SubmititSweep, ValidatedSweep, refuse
from exp.sweep.manifest import read_manifest, write_manifest
from exp.sweep.pruning import JOURNAL, make_pruner, storage_spec
from exp.sweep.supervise import (
    INTERRUPTED_EXIT,
    Flight,
    Interrupts,
    NoResult,
    Outcome,
    Watch,
    stopped_line,
    waiting_line,
)
from exp.text import first_line, fmt_loss

log = logging.getLogger("exp")

SAMPLERS = {"tpe": "TPESampler", "cmaes": "CmaEsSampler", "random": "RandomSampler", "grid": "GridSampler"}
KEYS = (
    "sampler objective direction study_name storage n_trials parallelism pruner pruner_args max_failure_rate params "
    "poll_interval_s synchronous"
).split()


class OptunaSweeper(Sweeper):
    """Hydra's sweeper interface over an Optuna study; the settings are `hydra.sweeper.*` (conf/hydra/sweeper)."""

    def __init__(self, **settings: Any):
        self.settings = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in settings.items()}
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    # --- settings, checked before anything is written ---------------------------------------------------

    def _settings(self, arguments: list[str], sweep_dir: Path) -> dict:
        s = self.settings
        unknown = [k for k in s if k not in KEYS and k != "_target_"]
        if unknown:
            hint = " (trials in flight: hydra.sweeper.parallelism)" if "n_jobs" in unknown else ""
            refuse(sweep_dir, f"hydra.sweeper.{unknown[0]}: unknown key{hint}; known: {', '.join(KEYS)}")
        try:
            objectives = objective.parse(s.get("objective", objective.DEFAULT), s.get("direction", "minimize"))
        except ValueError as e:
            refuse(sweep_dir, str(e))
        for key in ("n_trials", "parallelism"):
            if not isinstance(s.get(key, 1), int) or isinstance(s.get(key, 1), bool) or s.get(key, 1) < 1:
                refuse(sweep_dir, f"hydra.sweeper.{key}={s.get(key)}: must be an integer >= 1")
        rate = s.get("max_failure_rate", 0.5)
        if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            refuse(sweep_dir, f"hydra.sweeper.max_failure_rate={rate}: must be a number in [0, 1]")
        pruner = str(s.get("pruner") or "none")
        try:
            make_pruner(pruner, s.get("pruner_args"))
        except ValueError as e:
            refuse(sweep_dir, f"hydra.sweeper.pruner={pruner}: {e}")
        if objectives.multi and pruner != "none":
            refuse(sweep_dir, f"hydra.sweeper.pruner={pruner}: Optuna prunes single-objective studies only")
        space, fixed = search_space(s.get("params") or {}, arguments, sweep_dir)
        sampler_cfg = dict(s.get("sampler") or {"name": "tpe"})
        name = sampler_cfg.pop("name", "tpe")
        try:
            sampler = make_sampler(name, sampler_cfg, space)
        except ValueError as e:
            refuse(sweep_dir, f"hydra.sweeper.sampler: {e}")
        if objectives.multi and name == "cmaes":
            refuse(sweep_dir, "hydra.sweeper.sampler=cmaes: CMA-ES optimises one objective (use tpe or random)")
        storage = storage_spec(s.get("storage"), sweep_dir)
        if not storage.startswith(JOURNAL):
            try:  # a URL SQLAlchemy cannot read, or a database it has no driver for
                import sqlalchemy

                sqlalchemy.engine.make_url(storage).get_dialect()
            except Exception as e:
                refuse(sweep_dir, f"hydra.sweeper.storage={s.get('storage')}: {first_line(e)}")
        n_trials = s.get("n_trials", 20)
        if name == "grid":  # the grid's size bounds the study: a grid sampler repeats points past it
            n_trials = min(n_trials, math.prod(len(d.choices) for d in space.values()))
        return {
            "space": space,
            "fixed": fixed,
            "sampler": sampler,
            "sampler_name": name,
            "sampler_args": sampler_cfg,
            "pruner": pruner,
            "pruner_args": s.get("pruner_args") or {},
            "storage": storage,
            "study_name": str(s.get("study_name") or "exp"),
            "objectives": objectives,
            "direction": objectives.directions[0] if not objectives.multi else list(objectives.directions),
            "n_trials": n_trials,
            "parallelism": s.get("parallelism", 1),
            "max_failure_rate": float(rate),
            "poll_interval_s": float(s.get("poll_interval_s", 1.0)),
            "synchronous": bool(s.get("synchronous", False)),
        }

    # --- the study ------------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list:
        import optuna

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        HydraConfig.instance().set_config(self.config)  # the sweep's own overrides for sweep.json, not a trial's
        if self.settings.get("params") is None and not any(_is_sweep(a) for a in arguments):
            # `python -m exp.sweep rerun-failed`: one trial again in its run dir, through the sweep's launcher
            return [self.launcher.launch([list(arguments)], 0)]
        if not isinstance(self.launcher, ValidatedSweep):
            name = HydraConfig.get().runtime.choices.get("hydra/launcher")
            refuse(
                sweep_dir,
                f"hydra/launcher={name}: the Optuna sweeper runs trials through exp_basic, exp_local or exp_slurm",
            )
        cfg = self._settings(arguments, sweep_dir)
        # one point of the space, checked like every trial before anything is written: a bad fixed override
        # (`stage.num_stepz=3`) ends here with one line and exit 2
        point = [*cfg["fixed"], *as_overrides(first_point(cfg["space"]))]
        self.launcher._validate([point], 0, sweep_dir)
        try:  # an objective no trial would log (eval/<task>/... without that task evaluated) ends here too
            objective.check_logged(cfg["objectives"], self._trial_config(point))
        except ValueError as e:
            refuse(sweep_dir, str(e))
        try:  # one process drives a study: a second (`exp.sweep resume` while it runs) is refused
            lock = RunLock(sweep_dir).acquire()
        except RunDirInUse as e:
            print(f"error: {e}", flush=True)
            raise SystemExit(2) from None
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from exp.sweep.pruning import open_storage

        objectives = cfg["objectives"]
        study = optuna.create_study(
            storage=open_storage(cfg["storage"]),
            study_name=cfg["study_name"],
            sampler=cfg["sampler"],
            pruner=make_pruner(cfg["pruner"], cfg["pruner_args"]),
            directions=list(objectives.directions),
            load_if_exists=True,
        )
        if [d.name.lower() for d in study.directions] != list(objectives.directions):
            refuse(
                sweep_dir,
                f"hydra.sweeper.direction: the study {cfg['study_name']} in {cfg['storage']} was "
                f"created for {len(study.directions)} objective(s) {[d.name.lower() for d in study.directions]}",
            )
        study.set_user_attr("objectives", list(objectives.names))
        seed, num_existing = cfg["sampler_args"].get("seed"), len(study.trials)
        if seed is not None and num_existing:  # resumed: a sampler seeded as before would replay the same points
            study.sampler = make_sampler(
                cfg["sampler_name"], {**cfg["sampler_args"], "seed": seed + num_existing}, cfg["space"]
            )
        study.set_user_attr("pruner", cfg["pruner"])  # the trials build the same pruner (OptunaPruning)
        study.set_user_attr("pruner_args", cfg["pruner_args"])
        try:
            return StudyRun(self.launcher, study, cfg, sweep_dir).run()
        finally:
            lock.release()

    def _trial_config(self, overrides: list[str]) -> DictConfig:
        """A trial's composed config (its `eval` node says which tasks it evaluates)."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


class StudyRun:
    """One process driving a study: ask, launch, poll, tell, until n_trials have ended (or too many failed).
    Ctrl-C stops asking: the trials in flight save and end KILLED, and stay in flight in the study (RUNNING, user
    attribute status=KILLED) so that `python -m exp.sweep resume` continues them from their checkpoints."""

    def __init__(self, launcher, study, cfg: dict, sweep_dir: Path):
        self.launcher, self.study, self.cfg, self.sweep_dir = launcher, study, cfg, sweep_dir
        self.parent = None
        self.watch = Watch(sweep_dir)
        self.interrupted = False
        self._stopped: list[int] = []  # trials the study's own Ctrl-C stopped: left in flight for a resume
        # exp_basic runs a trial in this process: start() returns once it has ended
        self.parallelism = cfg["parallelism"] if isinstance(launcher, SubmititSweep) else 1
        if self.parallelism < cfg["parallelism"]:
            n = cfg["parallelism"]
            log.info(f"hydra/launcher=exp_basic runs one trial at a time; exp_local or exp_slurm run {n}")

    @property
    def in_flight(self) -> list[Flight]:
        return self.watch.flights

    def run(self) -> list:
        status = "KILLED"  # a trial run in this process and stopped by a signal ends the study (SystemExit)
        stopped = []
        try:
            with Interrupts() as ctrl_c:
                try:
                    self._continue_in_flight()
                    self._loop(ctrl_c)
                except KeyboardInterrupt:
                    nums = ", ".join(f"#{f.number}" for f in self.in_flight)
                    print(f"interrupted again: no longer waiting for {nums}", flush=True)
                stopped = [f.number for f in self.in_flight]
            status = "KILLED" if ctrl_c.requested else "FINISHED"
            self.interrupted = ctrl_c.requested
        finally:
            self._end(status)
        if self.interrupted:
            manifest = read_manifest(self.sweep_dir)
            ended = [manifest["trials"][str(n)] for n in self._stopped + stopped if str(n) in manifest["trials"]]
            print(stopped_line(self.sweep_dir, ended, "resume"), flush=True)
            raise SystemExit(INTERRUPTED_EXIT)
        return []

    def _loop(self, ctrl_c: Interrupts) -> None:
        stopping = False
        while True:
            if ctrl_c.requested and not self.watch.stopping:
                print(waiting_line(self.in_flight), flush=True)
                self.watch.stop()
            # synchronous: a batch of `parallelism` trials, the next asked once all have ended (Hydra's sweepers)
            batch_open = not (self.cfg["synchronous"] and self.in_flight)
            while (
                not stopping
                and not ctrl_c.requested
                and batch_open
                and len(self.in_flight) < self.parallelism
                and self._asked() < self.cfg["n_trials"]
            ):
                trial = self.study.ask(self.cfg["space"])
                self._start(trial.number, [*self.cfg["fixed"], *as_overrides(trial.params)], trial.params)
                stopping = self._collect_ended()  # exp_basic: the trial has ended already
            if not self.in_flight:
                break
            time.sleep(self.cfg["poll_interval_s"])
            stopping = self._collect_ended() or stopping

    def _end(self, status: str) -> None:
        """The study's results (optimization_results.yaml, one log line) and its MLflow run closed with its best."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        counts = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete and self.cfg["objectives"].multi:
            front = sorted(self.study.best_trials, key=lambda t: t.number)
            write_json(
                self.sweep_dir / "optimization_results.yaml",
                {
                    "name": "optuna",
                    "objectives": list(self.cfg["objectives"].names),
                    "directions": list(self.cfg["objectives"].directions),
                    "pareto_front": [{"trial": t.number, "values": t.values, "params": t.params} for t in front],
                },
            )
            numbers = ", ".join(f"#{t.number}" for t in front)
            log.info(f"study {self.study.study_name}: {summary}; Pareto front: {numbers}")
        elif complete:
            best = self.study.best_trial
            write_json(
                self.sweep_dir / "optimization_results.yaml",  # JSON is YAML: the file Hydra's Optuna sweeper wrote
                {"name": "optuna", "best_params": best.params, "best_value": best.value, "best_trial": best.number},
            )
            log.info(f"study {self.study.study_name}: {summary}; best #{best.number} {best.value:.4f} {best.params}")
            if self.parent is not None:
                self.parent.record_best(best.value, best.params, best.number)
        else:
            log.info(f"study {self.study.study_name}: {summary}; no trial completed")
        if self.parent is not None:
            self.parent.end(status)

    def _asked(self) -> int:
        """Trials of the study so far; enqueued ones (WAITING) count once asked."""
        from optuna.trial import TrialState

        return sum(t.state != TrialState.WAITING for t in self.study.get_trials(deepcopy=False))

    # --- starting trials ------------------------------------------------------------------------------

    def _start(self, number: int, overrides: list[str], params: dict | None = None) -> None:
        spec, name = self.cfg["storage"], self.cfg["study_name"]
        metric = self.cfg["objectives"].names[0] if not self.cfg["objectives"].multi else None
        callback = (
            f"+callbacks.optuna={{_target_:exp.sweep.pruning.OptunaPruning,storage:'{spec}',"
            f"study_name:'{name}',trial_number:{number}"
            + (f",metric:'{metric}'" if metric and metric != objective.DEFAULT else "")
            + "}"
        )
        launched, self.parent = self.launcher.prepare(
            [[*overrides, callback]], number, parent=self.parent, points=[params or {}]
        )
        manifest = read_manifest(self.sweep_dir)
        manifest.setdefault(
            "study",
            {
                "storage": spec,
                "study_name": name,
                "objective": list(self.cfg["objectives"].names),
                "direction": self.cfg["direction"],
                "pruner": self.cfg["pruner"],
            },
        )
        entry = manifest["trials"][str(number)]
        entry["started"] = started = time.time()
        entry.pop("ended", None)
        entry.pop("error", None)
        write_manifest(self.sweep_dir, manifest)
        log.info(f"trial #{number} starting: {' '.join(o for o in overrides)}")  # in-process: before it runs
        if isinstance(self.launcher, SubmititSweep):
            flight = self.launcher.submit(launched, number)[0]
            log.info(f"trial #{number}: job {flight.job.job_id}")
        else:
            flight = Flight(number, self.launcher.start(launched[0], number), Path(entry["run_dir"]), started)
        self.watch.flights.append(flight)

    def _continue_in_flight(self) -> None:
        """Trials the study holds as RUNNING: a previous launching process died (or was interrupted) with them in
        flight. A job that still runs (SLURM) is waited for; the others are rerun in their run dirs, resuming from
        their last checkpoint when they have one."""
        from optuna.trial import TrialState

        manifest = read_manifest(self.sweep_dir) or {"trials": {}}
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            entry = manifest["trials"].get(str(trial.number))
            if entry is None:  # asked, never launched: its point is in the study
                self._start(trial.number, [*self.cfg["fixed"], *as_overrides(trial.params)], trial.params)
                continue
            job = self._reattach(entry)
            if job is not None:
                log.info(f"trial #{trial.number}: was in flight; waiting for its job {entry.get('job_id')}")
                self.watch.flights.append(Flight(trial.number, job, Path(entry["run_dir"]), entry.get("started")))
                continue
            saved = checkpoints_of(entry["run_dir"])
            where = f"from its checkpoint {saved[-1].name}" if saved else "from the start (it saved no checkpoint)"
            log.info(f"trial #{trial.number}: was in flight; rerunning it in {entry['run_dir']} {where}")
            self._start(trial.number, list(entry["overrides"]), trial.params)

    def _reattach(self, entry: dict):
        """The job of a trial in flight when the previous launching process died, when it still runs or has
        ended since; None when it must be rerun."""
        run_dir = Path(entry["run_dir"])
        if entry.get("job_id") and isinstance(self.launcher, SlurmSweep):
            import submitit

            job = submitit.SlurmJob(folder=self.launcher.params["submitit_folder"], job_id=entry["job_id"])
            state = slurm_states([entry["job_id"]]).get(entry["job_id"])
            if state is not None and state.active:
                return job
        if lock_holder(run_dir):  # a process still trains in the run dir (a local job that outlived its launcher)
            return Holding(run_dir)
        summary = fresh_summary(run_dir, entry.get("started")) or {}
        if summary.get("status") in ("FINISHED", "PRUNED", "FAILED"):
            return Holding(run_dir)  # it ended after its launcher died: told from its summary, not rerun
        return None

    # --- ended trials ---------------------------------------------------------------------------------

    def _collect_ended(self) -> bool:
        """Tell the study about every trial whose job ended; whether the sweep must stop (too many failures)."""
        ended = self.watch.ended()
        for flight, outcome in ended:
            self._tell(flight, outcome)
        return bool(ended) and self._too_many_failures()

    def _tell(self, flight: Flight, outcome: Outcome) -> None:
        """The study learns how the trial ended: COMPLETE with its value, PRUNED, or FAIL (FAILED, or KILLED by a
        signal while the study went on); a trial stopped by the study's own Ctrl-C stays in flight (RUNNING).
        The user attribute `status` holds exp's status, which Optuna has no state for."""
        import optuna
        from optuna.trial import TrialState

        status = outcome.status
        optuna.trial.Trial(self.study, self._trial_id(flight.number)).set_user_attr("status", status)
        if status == "KILLED" and self.watch.stopping:
            self._stopped.append(flight.number)
        elif status == "PRUNED":
            self.study.tell(flight.number, state=TrialState.PRUNED)
        elif status == "FINISHED" and self._objective_values(flight, outcome) is not None:
            values = outcome.objective_values
            self.study.tell(flight.number, values if self.cfg["objectives"].multi else values[0])
        else:
            self.study.tell(flight.number, state=TrialState.FAIL)
            status = "FAILED" if status == "FINISHED" else status
        said = f" ({outcome.error})" if outcome.error and status != "FINISHED" else ""
        log.info(f"trial #{flight.number} {status}: {self._said(flight, outcome)}{said}")

    def _objective_values(self, flight: Flight, outcome: Outcome) -> list[float] | None:
        """The finished trial's objective values; None (the trial FAILED in the study and in sweep.json, with the
        line saying which metric was missing) when one was never logged."""
        objectives = self.cfg["objectives"]
        if objectives.is_default:
            outcome.objective_values = [outcome.value] if math.isfinite(outcome.value) else None
            return outcome.objective_values
        try:
            outcome.objective_values = objective.values(flight.run_dir, objectives)
        except objective.MissingObjective as e:
            import optuna

            outcome.error = str(e)
            optuna.trial.Trial(self.study, self._trial_id(flight.number)).set_user_attr("status", "FAILED")
            self._record_failed(flight, outcome.error)
            return None
        return outcome.objective_values

    def _record_failed(self, flight: Flight, error: str) -> None:
        manifest = read_manifest(self.sweep_dir)
        entry = manifest["trials"][str(flight.number)]
        entry["status"], entry["error"] = "FAILED", error
        write_manifest(self.sweep_dir, manifest)

    def _said(self, flight: Flight, outcome: Outcome) -> str:
        values = outcome.objective_values
        if values is None or self.cfg["objectives"].is_default:
            return f"val loss {fmt_loss(outcome.value)}"
        return ", ".join(f"{n} {v:.4g}" for n, v in zip(self.cfg["objectives"].names, values, strict=True))

    def _trial_id(self, number: int) -> int:
        storage = self.study._storage
        return storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)

    def _too_many_failures(self) -> bool:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        failed = sum(t.state == TrialState.FAIL for t in trials)
        limit = self.cfg["max_failure_rate"] * self.cfg["n_trials"]
        if failed <= limit:
            return False
        ended = sum(t.state.is_finished() for t in trials)
        print(
            f"stopping the sweep: {failed} of {ended} trials FAILED, more than hydra.sweeper.max_failure_rate="
            f"{self.cfg['max_failure_rate']:g} of n_trials={self.cfg['n_trials']}",
            flush=True,
        )
        return True


class Holding:
    """A trial another process still trains (it holds the run dir's lock), or one that ended while no launcher
    watched it: done once the lock is free; its result is its summary's."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def done(self) -> bool:
        return not lock_holder(self.run_dir)

    def results(self) -> list:
        summary = read_summary(self.run_dir)
        if summary is None:
            raise NoResult(f"{self.run_dir}: its trainer ended without summary.json")
        return [Returned(summary.get("val_loss"))]


@dataclass
class Returned:
    return_value: Any


# --- the search space -----------------------------------------------------------------------------------


class SpaceError(ValueError):
    """A search-space override that does not parse or names no distribution (`key` says which), or no search
    space at all (`key` None)."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key


def parse_space(lines: dict[str, str]) -> tuple[dict, list[str]]:
    """The one reading of a search space: Optuna distributions of the sweep overrides among `lines` ({key: the
    override line}), and the other overrides, fixed for every trial. The sweeper and the job service call it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    space, fixed = {}, []
    for key, line in lines.items():
        try:
            override = parser.parse_override(line)
            if not override.is_sweep_override():
                fixed.append(line)
                continue
            space[override.get_key_element()] = distribution(override)
        except (HydraException, ValueError, TypeError) as e:
            raise SpaceError(key, first_line(e)) from e
    if not space:
        raise SpaceError(None, "no search space")
    return space, fixed


def search_space(params: dict, arguments: list[str], sweep_dir: Path) -> tuple[dict, list[str]]:
    """Optuna distributions of the sweep overrides in `params` and on the command line (which wins), and the
    overrides that are not sweeps, fixed for every trial; a bad one refused with its key."""
    lines = {str(k): f"{k}={v}" for k, v in params.items()}
    for argument in arguments:
        lines[argument.split("=", 1)[0].lstrip("+~")] = argument
    try:
        return parse_space(lines)
    except SpaceError as e:
        if e.key is None:
            example = "stage.learning_rate: tag(log, interval(1e-4, 1e-2))"
            refuse(sweep_dir, f"hydra.sweeper.params: no search space (e.g. {example})")
        where = f"hydra.sweeper.params.{e.key}" if e.key in params else e.key
        refuse(sweep_dir, f"{where}: {e}")


def _is_sweep(argument: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(argument).is_sweep_override()
    except Exception:
        return False


def distribution(override):
    """The Optuna distribution of one sweep override."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, ChoiceSweep):
        choices = list(override.sweep_iterator())
        if not all(isinstance(c, (str, int, float, bool, type(None))) for c in choices):
            raise ValueError("choice() takes numbers, strings, booleans or null")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop - value.step, step=value.step)
        return IntDistribution(int(value.start), int(value.stop) - int(value.step), step=int(value.step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"{type(value).__name__} is not a search space Optuna can sample")


def make_sampler(name: str, args: dict, space: dict):
    """The Optuna sampler called `name` (SAMPLERS) with its keyword arguments (seed, ...)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}' (one of: {', '.join(SAMPLERS)})")
    if name == "cmaes" and importlib.util.find_spec("cmaes") is None:  # optuna imports it only when sampling
        raise ValueError("cmaes needs the cmaes package: pip install -e '.[cmaes]'")
    if name == "grid":
        grid = {}
        for key, d in space.items():
            if isinstance(d, CategoricalDistribution):
                grid[key] = list(d.choices)
            elif isinstance(d, IntDistribution) and not d.log:
                grid[key] = list(range(d.low, d.high + 1, d.step))
            else:
                raise ValueError(f"grid needs choices; {key} is a continuous interval")
        args = {"search_space": grid, **args}
    try:
        return getattr(optuna.samplers, SAMPLERS[name])(**args)
    except (TypeError, ImportError, ModuleNotFoundError) as e:
        raise ValueError(f"{name}: {first_line(e)}") from None


def first_point(space: dict) -> dict:
    """A point of the space to validate before the study exists: each low bound or first choice."""
    return {k: d.choices[0] if hasattr(d, "choices") else d.low for k, d in space.items()}


def as_overrides(params: dict) -> list[str]:
    """Hydra overrides of a trial's parameters."""
    out = []
    for key, value in params.items():
        if value is None:
            value = "null"
        elif isinstance(value, bool):
            value = str(value).lower()
        out.append(f"{key}={value}")
    return out
