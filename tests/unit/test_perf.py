"""MFU: the peak table by device name and precision, and the PaLM/nanoGPT definition of FLOPs per token."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from exp.model import GPT
from exp.model.protocol import flops_per_token
from exp.perf import device_peak, mfu, peak_flops

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name, dtype, tflops",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),  # SXM
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA H100 NVL", torch.float16, 835.5),
        ("NVIDIA H200", torch.bfloat16, 989.4),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA A100 80GB PCIe", torch.bfloat16, 312.0),
        ("NVIDIA L40S", torch.bfloat16, 362.05),  # not the L4's figure
        ("NVIDIA L4", torch.bfloat16, 121.0),
        ("NVIDIA A10G", torch.bfloat16, 125.0),
    ],
)
def test_known_accelerators_have_their_dense_datasheet_peak(name, dtype, tflops):
    assert device_peak(name, dtype) == pytest.approx(tflops * 1e12)


def test_float32_reads_tf32_or_fp32_by_matmul_precision_and_unknown_devices_have_none():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert device_peak("NVIDIA A100-SXM4-40GB", torch.float32) == pytest.approx(156e12)
        torch.set_float32_matmul_precision("highest")
        assert device_peak("NVIDIA A100-SXM4-40GB", torch.float32) == pytest.approx(19.5e12)
    finally:
        torch.set_float32_matmul_precision(before)
    assert device_peak("Some Future GPU", torch.bfloat16) is None
    assert peak_flops(torch.device("cpu"), torch.float32) is None  # no table for CPUs: no MFU, no error
    assert peak_flops(torch.device("cpu"), torch.float32, configured=2e11) == 2e11
    assert mfu(1e6, 1e4, None) is None


def test_flops_per_token_and_mfu_follow_nanogpts_estimate_mfu():
    """nanoGPT's estimate_mfu: N = the parameters (a tied embedding once), flops per token 6 N + 12 L H Q T, MFU the
    achieved FLOP/s over the peak; exp's GPT declares the same count (its input embedding is its output head)."""
    L, d, T = 3, 96, 64
    model = GPT(vocab_size=264, seq_len=T, n_layer=L, n_head=4, d_model=d)
    n = sum(p.numel() for p in model.parameters())
    nanogpt = 6 * n + 12 * L * d * T  # H * Q = d_model
    assert flops_per_token(model, T) == nanogpt
    tokens_per_s, peak, devices = 12_345.0, 312e12, 2
    assert mfu(nanogpt, tokens_per_s, peak, devices) == pytest.approx(nanogpt * tokens_per_s / devices / peak)


def test_system_metrics_watch_only_the_jobs_own_gpus():
    from exp.tracking.worker import own_gpus

    assert own_gpus(8, None) == list(range(8))  # nothing said: every GPU of the node
    assert own_gpus(8, "2,5") == [2, 5]  # SLURM's allocation
    assert own_gpus(2, "1,3") == [1]
    assert own_gpus(4, "GPU-8f3c0e2a-1b2c") == [0, 1, 2, 3]  # UUIDs: NVML's order is not theirs, keep all


@pytest.mark.parametrize(
    "override, line",
    [
        ("profile.steps=[5,2]", r"^profile\.steps=\[5, 2\] must have 1 <= first <= last$"),
        ("profile.steps=[0,2]", r"^profile\.steps=\[0, 2\] must have 1 <= first <= last$"),
        ("profile.steps=[3]", r"^profile\.steps=\[3\] must be \[first, last\]"),
        ("hardware.peak_flops=-1", r"^hardware\.peak_flops=-1\.0 must be > 0"),
        ("tracking.system_metrics_interval=0", r"tracking\.system_metrics_interval=0\.0 must be > 0"),
        ("tracking.ui_url=ftp://lab", r"^tracking\.ui_url=ftp://lab must be an http:// or https:// address"),
    ],
)
def test_bad_speed_settings_are_one_line_config_errors(tmp_path, override, line):
    from exp.config import validate
    from exp.errors import ConfigError

    from ..conftest import TINY, compose_train

    tiny = [o for o in TINY if o != "tracking=none"]
    cfg = compose_train(*tiny, override, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=line):
        validate(cfg)
    assert not (tmp_path / "run").exists()


def test_a_profile_request_is_a_positive_number_of_steps(tmp_path):
    from exp.profiling import read_request, write_request

    assert read_request(write_request(tmp_path, 7)) == 7
    for text in ("0", "-3", "abc", ""):
        (tmp_path / "profile.request").write_text(text)
        assert read_request(tmp_path / "profile.request") is None


def test_the_mlflow_worker_starts_without_torch():
    """The worker process imports only MLflow's side of exp: it runs under SCHED_IDLE beside a trainer that keeps
    every core busy, and a second of torch import there put its first metric behind the end of short runs."""
    code = "import sys, exp.tracking.worker; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_system_metrics_samples_come_at_their_interval_and_continue_a_resumed_runs_steps():
    from exp.tracking.worker import SystemMetrics

    system = SystemMetrics(interval=0.3, first_step=7)  # a resumed run whose last sample was step 6
    assert 0.2 < system.wait() <= 0.3
    time.sleep(system.wait())
    first = {m.key: m for m in system.sample()}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(first)
    assert {m.step for m in first.values()} == {7} and 0 <= first["system/cpu_utilization_percentage"].value <= 100
    assert 0.2 < system.wait() <= 0.3  # the next one an interval on
    assert {m.step for m in system.sample()} == {8}


def test_the_dashboards_mlflow_link_needs_a_ui_and_the_runs_own_record(tmp_path):
    """The link to the MLflow UI's page of a run: under tracking.ui_url, else under an http(s) tracking URI; none for
    a SQLite store without a UI address, for another run's record, before the tracker recorded the experiment, or when
    mlflow_run.json is a symlink (never followed)."""
    import json

    from exp.serve.control import mlflow_url, run_record

    marker = tmp_path / "mlflow_run.json"
    marker.write_text(json.dumps({"tracking_uri": "http://10.0.0.5:5000", "run_id": "r1", "experiment_id": "7"}))
    assert mlflow_url(run_record(tmp_path), "r1", None) == "http://10.0.0.5:5000/#/experiments/7/runs/r1"
    assert mlflow_url(run_record(tmp_path), "r1", "https://mlflow.lab/") == "https://mlflow.lab/#/experiments/7/runs/r1"
    assert mlflow_url(run_record(tmp_path), "r2", None) is None  # the record is another run's
    marker.write_text(json.dumps({"tracking_uri": "sqlite:///runs/mlflow.db", "run_id": "r1", "experiment_id": "7"}))
    assert mlflow_url(run_record(tmp_path), "r1", None) is None
    assert (
        mlflow_url(run_record(tmp_path), "r1", "http://127.0.0.1:5000")
        == "http://127.0.0.1:5000/#/experiments/7/runs/r1"
    )
    marker.write_text(json.dumps({"tracking_uri": "http://10.0.0.5:5000", "run_id": "r1"}))  # an older record
    assert mlflow_url(run_record(tmp_path), "r1", None) is None
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"tracking_uri": "http://10.0.0.5:5000", "run_id": "r1", "experiment_id": "7"}))
    marker.unlink()
    marker.symlink_to(elsewhere)
    assert run_record(tmp_path) is None and mlflow_url(run_record(tmp_path), "r1", None) is None
