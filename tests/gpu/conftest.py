"""The GPU tier: every test here needs CUDA (`pytest -m gpu`, skipped without it). The helpers the tests use
(tests/gpu/helpers.py) run on CPU too, in tests/unit/test_gpu_helpers.py, so a GPU run only adds the device."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    for item in items:
        if "/tests/gpu/" in str(item.path):
            item.add_marker(pytest.mark.gpu)
            item.add_marker(skip)
