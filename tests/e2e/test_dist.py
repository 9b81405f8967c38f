"""DDP (and FSDP) on CPU with gloo, two processes started by torchrun, as a user starts them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from exp.rundir import read_metrics

from ..conftest import ROOT, run_train

COMMON = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.seq_len=32",
    "stage.num_steps=12",
    "stage.log_every_n_steps=1",
    "stage.eval_every_n_steps=6",
    "sample.max_new_tokens=0",
    "tracking=none",
    "hardware.num_threads=1",
    "hardware.device=cpu",
]


# the job service's "save now" as SLURM may deliver it: SIGUSR1 to one rank only
SAVE_NOW_ON_RANK_1 = [
    "+callbacks.save_now._target_=tests.hooks.SignalAt",
    "+callbacks.save_now.step=2",
    "+callbacks.save_now.signal_name=SIGUSR1",
    "+callbacks.save_now.rank=1",
]


def torchrun(*overrides, cwd, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "train.py"),
        *overrides,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir):
    return [m["train/loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m]


@pytest.mark.slow
def test_ddp_two_ranks_of_batch_4_match_one_process_of_batch_8(tmp_path):
    proc = torchrun("hardware=ddp", *COMMON, "stage.batch_size_per_gpu=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").glob("*/*"))
    assert len(runs) == 1, runs  # both ranks wrote into rank 0's run directory, not one each
    ddp = runs[0]
    single = tmp_path / "single"
    proc = run_train("hardware=cpu", *COMMON, "stage.batch_size_per_gpu=8", f"hydra.run.dir={single}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["tokens_seen"] == 12 * 8 * 32  # both ranks' tokens
    rows = [m for m in read_metrics(ddp / "metrics.jsonl") if "perf/tokens_per_s" in m]
    assert all(m["perf/tokens_per_s"] == pytest.approx(2 * m["perf/tokens_per_s_per_rank"], rel=0.5) for m in rows)

    # a DDP checkpoint is an ordinary one: a single process starts from it
    proc = run_train(
        "hardware=cpu",
        *COMMON,
        "stage.num_steps=1",
        "stage.learning_rate=1e-9",
        f"stage.init_from={ddp}",
        f"hydra.run.dir={tmp_path / 'from_ddp'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(ddp / "checkpoints" / "step_00000012" / "model.safetensors")
    b = load_file(tmp_path / "from_ddp" / "checkpoints" / "step_00000001" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_ddp_resumes_at_the_same_world_size(tmp_path):
    """Stopped at step 5 and resumed, the losses are those of a run never stopped; a save-now (SIGUSR1) that
    reaches rank 1 alone at step 2 has every rank agree, rank 0 write step 2's checkpoint, and training go on."""
    run_dir = tmp_path / "run"
    stop = ["+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=5"]
    save_now = SAVE_NOW_ON_RANK_1
    proc = torchrun(
        "hardware=ddp",
        *COMMON,
        "stage.batch_size_per_gpu=4",
        f"hydra.run.dir={run_dir}",
        *stop,
        *save_now,
        "checkpoint.every_n_steps=0",
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "KILLED"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000005"]
    assert "SIGUSR1: saving a checkpoint at step 2 and going on" in proc.stdout + proc.stderr
    assert "FutureWarning" not in proc.stderr
    proc = torchrun(
        "hardware=ddp",
        *COMMON,
        "stage.batch_size_per_gpu=4",
        f"hydra.run.dir={run_dir}",
        *stop,
        "resume.allow_config_change=true",
        cwd=tmp_path,
    )  # the stop callback fires at step 5 only
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = tmp_path / "straight"
    proc = torchrun("hardware=ddp", *COMMON, "stage.batch_size_per_gpu=4", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run_dir) == losses(straight)


def test_ddp_without_several_processes_says_how_to_launch(tmp_path):
    proc = run_train("hardware=ddp", *COMMON, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "torchrun --nproc_per_node=N train.py hardware=ddp" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fsdp_trains_saves_resumes_and_exports_a_consolidated_model(tmp_path):
    run_dir = tmp_path / "run"
    fsdp = [
        "hardware=fsdp",
        *COMMON,
        "stage.batch_size_per_gpu=4",
        "checkpoint.every_n_steps=6",
        f"hydra.run.dir={run_dir}",
    ]
    stop = ["+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=5"]
    proc = torchrun(*fsdp, *stop, *SAVE_NOW_ON_RANK_1, cwd=tmp_path)
    assert proc.returncode != 0
    for step in (2, 5):  # save-now on rank 1 alone: both ranks wrote their shard of step 2
        manifest = json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "manifest.json").read_text())
        assert manifest["sharded"] and manifest["world_size"] == 2

    # 3 ranks of 4 would change the global batch (8 -> 12): refused, one line per rank, nothing written
    proc = torchrun(*fsdp, cwd=tmp_path, nproc=3)
    assert proc.returncode != 0  # each rank exits 2; torchrun itself reports 1
    refusal = "with a global batch of 12 (3 ranks x 4 x 1 accumulation); it trained with 8 (2 ranks x 4 x 1"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error: resuming")]
    # each rank refuses in one line; torchrun stops the others once one has exited, so 1 to 3 of them are printed
    assert 1 <= len(lines) <= 3 and all(refusal in line for line in lines)
    assert str(ROOT / "exp") not in proc.stderr  # no traceback through exp (torchrun prints its own report)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000005"]
    assert not (run_dir / "config_changes.json").exists()

    proc = torchrun(*fsdp, "resume.allow_config_change=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = tmp_path / "straight"
    proc = torchrun("hardware=fsdp", *COMMON, "stage.batch_size_per_gpu=4", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run_dir) == losses(straight)

    from exp.export import load_model_for_inference
    from exp.export import main as export_main

    assert export_main([str(run_dir), str(tmp_path / "exported")]) == 0
    model, _ = load_model_for_inference(tmp_path / "exported")
    x = torch.randint(0, 264, (1, 16))
    again, _ = load_model_for_inference(run_dir / "checkpoints" / "step_00000012")
    assert torch.equal(model(x)[0], again(x)[0])
