"""The GPU tier's helpers (tests/gpu/helpers.py), run on CPU: every line a GPU run goes through but the device."""

import torch

from ..gpu import helpers


def test_the_overflow_helper_steps_on_cpu():
    steps = helpers.steps_with_overflow("cpu", torch.float32, num_steps=3)  # no fp16 here: no scaling, no skips
    assert [s["moved"] for s in steps] == [True, True, True]


def test_fused_and_generation_helpers_on_cpu():
    assert not helpers.optimizer_is_fused("cpu")  # fused AdamW is asked for on CUDA only
    assert helpers.cached_generation_agrees("cpu")
