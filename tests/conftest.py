"""Shared fixtures: one torch thread, the real config composed through Hydra's compose API."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
