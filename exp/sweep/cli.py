"""A sweep after its launch: `python -m exp.sweep status|resume|rerun-failed SWEEP_DIR [--dry-run] [--fresh]`."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from exp.paths import TRAIN_PY
from exp.rundir import lock_holder
from exp.sweep.manifest import SweepError, hydra_config, load_sweep, trials_of, write_manifest
from exp.text import fmt_loss
from exp.tracking.worker import RUN_MARKER

# --- relaunching ------------------------------------------------------------------------------------
# Hydra's sweepers only expand products of values, so trials with different overrides cannot share one multirun,
# and a multirun into the sweep dir would number its jobs from 0 again, overwriting sweep.json entries,
# multirun.yaml and optimization_results.yaml. So each trial is a one-job multirun through the sweep's own launcher
# (same primary config, Hydra overrides and job overrides) with hydra.sweep.subdir=<its run dir>: absolute, it
# wins over hydra.sweep.dir, which becomes <sweep>/.relaunch/<k>/<num> and holds that launch's own bookkeeping.
# resume=auto then continues each trial from its newest checkpoint. Local launchers run the trials one after
# another; on SLURM they are all submitted at once, since each launcher process waits for its job.

# Hydra overrides of the original command that must not reach a relaunch: it sets its own sweep dirs and sweeper.
DROPPED_HYDRA = ("hydra.sweep.", "hydra.run.", "hydra.mode", "hydra.sweeper.", "hydra.job.num", "hydra.job.id")


def relaunch_commands(sweep_dir: Path, manifest: dict, trials: list[dict], launch: int) -> list[dict]:
    """One `train.py -m` command per trial that reruns it through the sweep's launcher in its own run dir."""
    hydra = hydra_config(sweep_dir, manifest)
    head = train_command(hydra)
    head += [o for o in hydra.get("overrides", {}).get("hydra", []) if not o.lstrip("+~").startswith(DROPPED_HYDRA)]
    # the trial's own overrides already hold its point; the config's search space must not expand it again
    head.append("hydra.sweeper.params=null")
    # exp's Optuna sweeper runs the one point of a search space of null as one job, outside the study
    out, cwd = [], launch_cwd(hydra)
    for trial in trials:
        scratch = Path(sweep_dir).resolve() / ".relaunch" / str(launch) / str(trial["num"])
        command = [
            *head,
            # the launcher adds the sweep's parent run itself; a second value would be refused
            *(o for o in trial["overrides"] if not o.startswith("tracking.parent_run_id=")),
            f"hydra.sweep.dir={scratch}",
            f"hydra.sweep.subdir={Path(trial['run_dir']).resolve()}",
        ]
        out.append({"num": trial["num"], "run_dir": trial["run_dir"], "scratch": scratch, "cwd": cwd, "cmd": command})
    return out


def train_command(hydra: dict) -> list[str]:
    """`python train.py -m` with the config dir and name the sweep was composed from."""
    runtime, job = hydra.get("runtime", {}), hydra.get("job", {})
    main_conf = next((s["path"] for s in runtime.get("config_sources", []) if s.get("provider") == "main"), None)
    # the program that composed the sweep, so its conf/ and the trial configs match; this repo's otherwise
    train_py = Path(main_conf).parent / "train.py" if main_conf else TRAIN_PY
    if not train_py.exists():
        train_py = TRAIN_PY
    head = [sys.executable, str(train_py), "-m"]
    for source in runtime.get("config_sources", []):
        if source.get("provider") == "command-line" and source.get("schema") == "file":
            head += ["--config-dir", source["path"]]
    if job.get("config_name") and job["config_name"] != "config":
        head += ["--config-name", job["config_name"]]
    return head


def launch_cwd(hydra: dict) -> str:
    cwd = hydra.get("runtime", {}).get("cwd")
    return cwd if cwd and Path(cwd).is_dir() else os.getcwd()


def is_study(sweep_dir: Path, manifest: dict | None = None) -> bool:
    """Whether the sweep is an Optuna study of exp's sweeper (exp.sweep.optuna)."""
    target = str(hydra_config(sweep_dir, manifest).get("sweeper", {}).get("_target_", ""))
    return "exp_optuna_sweeper" in target or bool((manifest or {}).get("study"))


def resume_study(sweep_dir: Path, manifest: dict, dry_run: bool = False) -> int:
    """An Optuna study: its launching command again, into the same sweep dir. The sweeper finds the study in its
    storage and continues it (exp.sweep.optuna): ended trials kept, those in flight waited for or rerun from their
    checkpoints, numbering continued, until the study holds n_trials."""
    hydra = hydra_config(sweep_dir, manifest)
    overrides = hydra.get("overrides", {})
    command = [
        *train_command(hydra),
        *(o for o in overrides.get("hydra", []) if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))),
        *overrides.get("task", []),
        f"hydra.sweep.dir={Path(sweep_dir).resolve()}",
    ]
    holder = lock_holder(Path(sweep_dir))
    if holder:
        print(f"error: the study in {sweep_dir} is still being run by {holder}", file=sys.stderr)
        return 2
    cwd = launch_cwd(hydra)
    print(f"study {manifest.get('study', {}).get('study_name', '')} in {sweep_dir}: " + _counts(manifest))
    print(f"  cd {shlex.quote(cwd)} && {shlex.join(command)}", flush=True)
    if dry_run:
        return 0
    return subprocess.run(command, cwd=cwd).returncode


def is_slurm(sweep_dir: Path, manifest: dict) -> bool:
    hydra = hydra_config(sweep_dir, manifest)
    names = [
        str(hydra.get("runtime", {}).get("choices", {}).get("hydra/launcher", "")),
        str(hydra.get("launcher", {}).get("_target_", "")),
        str(manifest.get("launcher", "")),
    ]
    return any("slurm" in n.lower() for n in names)


def relaunch(sweep_dir: Path, mode: str, dry_run: bool = False, fresh: bool = False) -> int:
    """Rerun the trials `mode` selects (resume: not FINISHED or PRUNED; rerun-failed: FAILED or KILLED); 0 when
    every launch exited 0."""
    sweep_dir = Path(sweep_dir)
    manifest = load_sweep(sweep_dir, write=not dry_run)
    if mode == "resume" and is_study(sweep_dir, manifest):
        return resume_study(sweep_dir, manifest, dry_run)
    if mode == "rerun-failed":
        wanted = [t for t in trials_of(manifest) if t["status"] in ("FAILED", "KILLED")]
    else:
        wanted = [t for t in trials_of(manifest) if t["status"] not in ("FINISHED", "PRUNED")]
    trials = []
    for trial in wanted:
        holder = lock_holder(Path(trial["run_dir"]))
        if holder:
            print(f"trial {trial['num']}: skipped, {trial['run_dir']} is in use by {holder}")
        else:
            trials.append(trial)
    if not trials:
        print(f"nothing to {mode.replace('-', ' ')}: " + _counts(manifest))
        return 0
    launch = len(manifest.get("relaunches", []))
    commands = relaunch_commands(sweep_dir, manifest, trials, launch)
    slurm = is_slurm(sweep_dir, manifest)
    for c, trial in zip(commands, trials, strict=True):
        print(f"trial {c['num']} ({trial['status']}) -> {c['run_dir']}")
        print(f"  cd {shlex.quote(c['cwd'])} && {shlex.join(c['cmd'])}")
    if dry_run:
        return 0
    if fresh:  # from scratch: no checkpoint to resume, and a new MLflow run (the old one stays as it ended)
        for trial in trials:
            shutil.rmtree(Path(trial["run_dir"]) / "checkpoints", ignore_errors=True)
            (Path(trial["run_dir"]) / RUN_MARKER).unlink(missing_ok=True)
    for trial in trials:  # a summary.json older than this is the previous launch's
        manifest["trials"][str(trial["num"])]["started"] = time.time()
    marker = sweep_dir / "mlflow_run.json"
    for c in commands:
        c["scratch"].mkdir(parents=True, exist_ok=True)
        if marker.exists():  # the launcher then reopens the sweep's parent run instead of starting one
            shutil.copy(marker, c["scratch"] / marker.name)
    record = {
        "launch": launch,
        "mode": mode,
        "fresh": fresh,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "trials": [c["num"] for c in commands],
        "commands": [shlex.join(c["cmd"]) for c in commands],
    }
    _record(sweep_dir, manifest, record)
    if slurm:  # each launcher process blocks until its job ends: submit them all, then wait
        procs = [subprocess.Popen(c["cmd"], cwd=c["cwd"]) for c in commands]
        codes = [p.wait() for p in procs]
    else:  # local jobs would compete for the same cores
        codes = [subprocess.run(c["cmd"], cwd=c["cwd"]).returncode for c in commands]
    manifest = load_sweep(sweep_dir)
    record.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), returncodes=codes)
    _record(sweep_dir, manifest, record)
    for c, code in zip(commands, codes, strict=True):
        trial = manifest["trials"][str(c["num"])]
        print(f"trial {c['num']}: {trial['status']} (val loss {fmt_loss(trial.get('val_loss'))}, exit {code})")
    print(_counts(manifest))
    return 0 if all(code == 0 for code in codes) else 1


def _record(sweep_dir: Path, manifest: dict, record: dict) -> None:
    relaunches = manifest.setdefault("relaunches", [])
    relaunches[:] = [r for r in relaunches if r.get("launch") != record["launch"]] + [record]
    write_manifest(sweep_dir, manifest)


# --- the CLI ----------------------------------------------------------------------------------------


def status(sweep_dir: Path) -> int:
    """One line per trial and a count per status."""
    manifest = load_sweep(sweep_dir)
    rows = [["#", "status", "val loss", "run dir", "slurm job", "mlflow run"]]
    for t in trials_of(manifest):
        rows.append(
            [
                str(t["num"]),
                t["status"],
                fmt_loss(t.get("val_loss")),
                t["run_dir"],
                t.get("slurm_job_id") or "-",
                t.get("mlflow_run_id") or "-",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r, t in zip(rows, [None, *trials_of(manifest)], strict=True):
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        if t is not None and t.get("error"):
            line += f"  {str(t['error']).splitlines()[0]}"
        print(line)
    print(_counts(manifest))
    return 0


def _counts(manifest: dict) -> str:
    counts = Counter(t["status"] for t in manifest["trials"].values())
    return f"{sum(counts.values())} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exp.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["status", "resume", "rerun-failed"])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--fresh", action="store_true", help="rerun-failed: delete their checkpoints first")
    args = parser.parse_args(argv)
    try:
        if args.fresh and args.command != "rerun-failed":
            raise SweepError("--fresh only applies to rerun-failed")
        if args.command == "status":
            return status(args.sweep_dir)
        return relaunch(args.sweep_dir, args.command, dry_run=args.dry_run, fresh=args.fresh)
    except (SweepError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
