"""Sweeps, in one place.

- manifest: sweep.json (one entry per trial, refreshed from the trials' run directories) and reading any sweep
  directory, exp's or plain Hydra's and Optuna's
- launch: every point validated before anything is submitted, the manifest, the MLflow parent run; the launchers
  Hydra loads (hydra_plugins/exp_launcher, `hydra/launcher=exp_basic|exp_local|exp_slurm`) are these classes in
  front of Hydra's and submitit's
- supervise: every trial watched to its end and recorded once, with one status (Ctrl-C: trials save, end KILLED)
- jobs: where a trial stands without its launcher: the run dir's lock, SLURM's accounting, an MLflow run left open
- cli: what follows a launch, `python -m exp.sweep status|resume|rerun-failed SWEEP_DIR`
- report: trials ranked and their curves, `python -m exp.report SWEEP_DIR|RUN_DIR|EXPERIMENT`
"""
