"""train.py's job and its exit codes in one place: 2 for bad input before anything runs, 1 for a failed run or a sweep
with failed trials, 128+N for a signal."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import OmegaConf

from exp import config, rundir
from exp.errors import ConfigError, ExpError
from exp.sweep import launch

FAILED_TRIALS_EXIT = 1


# Hydra prints its own compose errors over several lines (and exits 1); with this set while the config is composed
# it raises them instead, and run_cli prints one line. Unset once the job starts: Hydra reports the job's own.
_OURS = "EXP_HYDRA_FULL_ERROR"


def run_job(cfg) -> float:
    """The job train.py's Hydra app runs: a pipeline of stages, or one run; returns the final val loss."""
    from exp import run  # torch is imported only once a job runs, not for --help or --cfg

    if os.environ.pop(_OURS, None):
        os.environ.pop("HYDRA_FULL_ERROR", None)

    try:
        if cfg.get("pipeline"):
            from exp.pipeline import run_pipeline

            return run_pipeline(cfg, train=run.train)
        return run.train(cfg)
    except ExpError as e:  # one line and the error's exit status: bad input 2, training failed 1, a signal 128+N
        print(e.line(), file=sys.stderr, flush=True)
        if isinstance(e, ConfigError):  # nothing of the run is kept: only what Hydra wrote before the job
            rundir.discard_untouched(OmegaConf.select(cfg, "run_dir", throw_on_resolution_failure=False))
        raise SystemExit(e.exit_code) from None


def run_cli(main: Callable) -> None:
    """Run a @hydra.main function; Hydra's own compose errors (exit 1 before the job starts) exit 2, and a sweep
    whose trials all ran but some FAILED exits 1 with one line saying how many and where to look.

    `resume=auto` / `resume=PATH` on the command line are short for `resume.path=...` and `lr_find=true` for
    `lr_find.enabled=true` (config.expand_shorthand): Hydra would replace the node with the value.
    """
    sys.argv = [sys.argv[0], *map(config.expand_shorthand, sys.argv[1:])]
    saved = _saved_run_config(sys.argv)
    if saved is not None:  # its config.yaml is the composed result: no groups, so `tracking=none` becomes a string
        print(
            f"config error: {saved} is a run's saved config (composed, no config groups); "
            f"repeat that run with: python -m exp.repeat {saved.parent} [OVERRIDES...]",
            file=sys.stderr,
        )
        sys.exit(config.CONFIG_ERROR_EXIT)
    if "HYDRA_FULL_ERROR" not in os.environ:
        os.environ["HYDRA_FULL_ERROR"] = os.environ[_OURS] = "1"
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not config.job_has_started():
            sys.exit(config.CONFIG_ERROR_EXIT)
        if isinstance(e.code, int) and e.code > 128:  # stopped by a signal, its ending written: exit as it says
            _ignore_stop_signals()
        raise
    except KeyboardInterrupt:  # Ctrl-C outside a run's own handling (before it, or again once its ending is written)
        _ignore_stop_signals()
        sys.exit(128 + signal.SIGINT)
    except HydraException as e:  # composing the config failed: an unknown key or group option, a bad override
        if config.job_has_started() or not os.environ.get(_OURS):
            raise
        print(ConfigError(config.hydra_message(e)).line(), file=sys.stderr, flush=True)
        sys.exit(config.CONFIG_ERROR_EXIT)
    finally:
        if os.environ.pop(_OURS, None):
            os.environ.pop("HYDRA_FULL_ERROR", None)
    for sweep_dir in launch.launched_sweeps():
        message = launch.failed_trials_message(sweep_dir)
        if message:
            print(message, file=sys.stderr)
            sys.exit(FAILED_TRIALS_EXIT)


def _ignore_stop_signals() -> None:
    """The process is exiting because of a signal: another Ctrl-C or SIGTERM must not change how (Python resets its
    own handlers to the default at exit, so a late SIGINT would kill the process with a different status)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _saved_run_config(argv: list[str]) -> Path | None:
    """The .hydra folder of a past run given as -cp/--config-path (relative to train.py) or -cd/--config-dir."""
    for i, arg in enumerate(argv[1:], start=1):
        name, eq, value = arg.partition("=")
        if name in ("-cp", "--config-path", "-cd", "--config-dir"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            for path in ((Path(argv[0]).resolve().parent / value).resolve(), Path(value).resolve()):
                if (path / "overrides.yaml").is_file() and (path / "config.yaml").is_file():
                    return path
    return None
