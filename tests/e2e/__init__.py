"""End-to-end tests: train.py, torchrun, the job service, sweeps, SLURM, MLflow servers and Chromium, run as a user
would run them. All of them are in the slow tier (tests/e2e/conftest.py marks them); `pytest -m 'not gpu'` runs
them with the unit tests, as CI does."""
