"""The GPU tier (pytest -m gpu; skipped without CUDA): mixed precision, fused kernels, compile, FSDP, memory figures,
generation and the document mask on a real device. Tolerances are stated where the test compares numbers."""

import json

import pytest
import torch

from exp.rundir import read_metrics

from ..e2e.test_dist import torchrun
from . import helpers

STEPS = ["stage.num_steps=200", "stage.log_every_n_steps=10", "stage.eval_every_n_steps=100"]


def test_bf16_tracks_fp32_over_200_steps(tmp_path):
    """bf16 autocast against fp32 (TF32 off) from the same seed: the logged train loss stays within 0.05 (absolute)
    of fp32's at every log interval over 200 steps, and both end below 60% of where they began."""
    fp32 = helpers.run(
        tmp_path / "fp32", *helpers.device_overrides("cuda", "float32"), "hardware.matmul_precision=highest", *STEPS
    )
    bf16 = helpers.run(tmp_path / "bf16", *helpers.device_overrides("cuda", "bfloat16"), *STEPS)
    a, b = helpers.losses(tmp_path / "fp32"), helpers.losses(tmp_path / "bf16")
    assert len(a) == len(b) == 20
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 0.05, (a, b)
    assert a[-1] < 0.6 * a[0] and b[-1] < 0.6 * b[0]
    assert fp32["status"] == bf16["status"] == "FINISHED"


def test_fp16_grad_scaler_skips_an_overflow_and_recovers():
    steps = helpers.steps_with_overflow("cuda", torch.float16, num_steps=8)
    assert not steps[0]["moved"]  # 2**40 overflows: the update is skipped and the scale halves
    assert steps[1]["scale"] < steps[0]["scale"]
    assert steps[-1]["moved"] and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps[-3:])


def test_adamw_uses_its_fused_cuda_kernel():
    assert helpers.optimizer_is_fused("cuda")


def test_compiled_run_trains_checkpoints_and_resumes(tmp_path):
    common = [
        *helpers.device_overrides("cuda", "bfloat16", compile=True),
        "stage.num_steps=20",
        "checkpoint.every_n_steps=10",
        "stage.eval_every_n_steps=10",
    ]
    stop = ["+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=10"]
    helpers.run(tmp_path / "run", *common, *stop)
    summary = helpers.run(tmp_path / "run", *common, "resume=auto")
    assert summary["status"] == "FINISHED" and summary["step"] == 20 and summary["compile_seconds"] is not None
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()


def test_fsdp_on_one_gpu_trains_and_resumes(tmp_path):
    common = [
        "hardware=fsdp",
        "hardware.device=cuda",
        "stage.num_steps=12",
        "checkpoint.every_n_steps=6",
        "model.n_layer=2",
        "model.d_model=64",
        "model.seq_len=32",
        "tracking=none",
        f"hydra.run.dir={tmp_path}/run",
    ]
    stop = ["+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=6"]
    first = torchrun(*common, *stop, cwd=tmp_path, nproc=1)
    assert first.returncode != 0  # stopped by the signal, with a checkpoint
    second = torchrun(*common, "resume=auto", cwd=tmp_path, nproc=1)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["step"] == 12


def test_peak_memory_metric_is_cudas_max_memory_allocated(tmp_path):
    torch.cuda.reset_peak_memory_stats()
    helpers.run(
        tmp_path / "run",
        *helpers.device_overrides("cuda", "bfloat16"),
        "stage.num_steps=10",
        "stage.log_every_n_steps=10",
    )
    logged = [
        m["perf/peak_memory_mb"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "perf/peak_memory_mb" in m
    ]
    assert logged[-1] == pytest.approx(torch.cuda.max_memory_allocated() / 2**20, rel=0.01)


def test_generation_with_the_kv_cache_on_cuda_matches_the_loop_without():
    assert helpers.cached_generation_agrees("cuda")


def test_dry_run_memory_estimate_is_within_30_percent_of_gpt_smalls_peak(tmp_path):
    from exp.config import validate
    from exp.plan import make_plan

    from ..conftest import compose_train

    overrides = [
        "model=gpt_small",
        "hardware=gpu",
        "hardware.compile=false",
        "stage.batch_size_per_gpu=8",
        "stage.num_steps=3",
        "stage.log_every_n_steps=1",
        "tracking=none",
    ]
    cfg = compose_train(*overrides, run_dir=tmp_path / "run")
    valid = validate(cfg)
    estimate = make_plan(cfg, valid.stage, valid.hardware)["memory_bytes"]["total"]
    torch.cuda.reset_peak_memory_stats()
    helpers.run(tmp_path / "run", *overrides)
    measured = torch.cuda.max_memory_allocated()
    assert abs(estimate - measured) / measured < 0.30, (estimate / 2**20, measured / 2**20)


def test_mfu_on_a_known_gpu_comes_from_the_datasheet_table(tmp_path):
    from exp.perf import device_peak

    summary = helpers.run(tmp_path / "run", *helpers.device_overrides("cuda", "bfloat16"), "stage.num_steps=20")
    peak = device_peak(torch.cuda.get_device_name(), torch.bfloat16)
    if peak is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in exp/perf.py's table")
    assert summary["peak_flops"] == peak and 0 < summary["mfu"] < 1
