"""exp's Optuna sweeper, where Hydra looks for plugins (`override hydra/sweeper: optuna`): exp.sweep.optuna."""

from exp.sweep.optuna import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    """Asynchronous, pruned, resumable Optuna study over exp's launchers (conf/hydra/sweeper/optuna.yaml)."""
