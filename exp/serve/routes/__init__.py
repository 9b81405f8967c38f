"""The job service's routes, one router per concern: configs (and the service's own), jobs, metrics, checkpoints,
sweeps, evaluations."""
