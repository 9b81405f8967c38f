"""stage=dpo end to end: DPO on the built-in set separates chosen from rejected, the reference stays frozen and out
of the checkpoint, a stopped run resumes bit-identically, the pretrain -> sft -> dpo pipeline chains, and bad
input is one line, exit 2, before anything is written."""

import hashlib
import json
import math

import pytest
from safetensors.torch import load_file

import exp.job
from exp.rundir import read_metrics

from ..conftest import TINY, compose_train, run_train
from .test_resume import assert_same, final_state, trajectory

SMALL = [*TINY, "model.seq_len=128", "stage.batch_size_per_gpu=8"]  # the stdlib prompts need a 128-token window


def train(run_dir, *overrides):
    try:
        return exp.job.run_job(compose_train(*overrides, run_dir=run_dir))
    except (SystemExit, KeyboardInterrupt):
        return None


def last_checkpoint(run_dir):
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft")
    train(run_dir, *SMALL, "stage=sft", "stage.num_steps=30", "stage.eval_every_n_steps=30")
    return run_dir


def test_dpo_on_the_built_in_set_prefers_chosen_and_leaves_the_reference_alone(sft_run, tmp_path):
    sft_weights = last_checkpoint(sft_run) / "model.safetensors"
    before = hashlib.sha256(sft_weights.read_bytes()).hexdigest()
    run_dir = tmp_path / "dpo"
    overrides = ["stage=dpo", f"stage.init_from={sft_run}", "stage.num_steps=30", "stage.learning_rate=2e-3"]
    overrides += ["data.max_examples=64", "stage.log_every_n_steps=5", "stage.eval_every_n_steps=15"]
    train(run_dir, *SMALL, *overrides)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "FINISHED"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [m for m in metrics if "train/rewards/accuracies" in m]
    val_rows = [m for m in metrics if "val/rewards/margins" in m]
    # before the first step the policy is the reference: DPO's loss is log 2 and every reward 0
    assert val_rows[0]["step"] == 0 and abs(val_rows[0]["val/loss"] - math.log(2)) < 1e-6
    assert val_rows[0]["val/rewards/chosen"] == val_rows[0]["val/rewards/margins"] == 0
    assert "val/perplexity" not in val_rows[0] and "val/chosen_nll" in val_rows[0]
    accuracies = [m["train/rewards/accuracies"] for m in train_rows]  # each over a log interval of 5 steps
    assert accuracies[0] < 0.8 and sum(accuracies[-2:]) / 2 > 0.9, accuracies
    assert train_rows[-1]["train/rewards/margins"] > train_rows[0]["train/rewards/margins"] > 0
    assert val_rows[-1]["val/rewards/margins"] > 0  # held-out pairs too (their loss rises again: 26 pairs overfit)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert f"train/{key}" in train_rows[-1]
    # the reference was read, never written, and is not in the checkpoint: the policy's tensors only
    assert hashlib.sha256(sft_weights.read_bytes()).hexdigest() == before
    saved = load_file(last_checkpoint(run_dir) / "model.safetensors")
    assert saved.keys() == load_file(sft_weights).keys()
    data = json.loads((run_dir / "summary.json").read_text())["data"]  # what truncation dropped is counted
    assert data["num_pairs"] == data["num_train_pairs"] + data["num_val_pairs"] > 0 and data["num_dropped"] > 0


def pairs_file(path):
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"Q{i}?", "chosen": f"yes {i} " * 2, "rejected": f"no {i}"}) + "\n")
    return path


def test_a_stopped_dpo_run_resumes_bit_identically(sft_run, tmp_path):
    pairs = pairs_file(tmp_path / "pairs.jsonl")
    base = [*TINY, "stage=dpo", "data=preference_jsonl", f"data.path={pairs}", f"stage.init_from={sft_run}"]
    base += ["model.seq_len=128", "stage.num_steps=12", "stage.log_every_n_steps=1", "stage.eval_every_n_steps=4"]
    base += ["checkpoint.every_n_steps=4", "checkpoint.keep_last=0", "model.dropout=0.1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(straight, *base)
    train(stopped, *base, "+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=6")
    assert json.loads((stopped / "summary.json").read_text())["step"] == 6
    train(stopped, *base, "resume=auto")
    assert trajectory(stopped) == trajectory(straight)
    assert_same(final_state(stopped), final_state(straight))


def test_pretrain_sft_dpo_pipeline_chains_the_stages(tmp_path):
    run_dir = tmp_path / "pipe"
    args = ["pipeline=pretrain_sft_dpo", "model=gpt_tiny", "model.n_layer=2", "model.d_model=64", "hardware=cpu"]
    args += ["model.seq_len=128", "stage.num_steps=6", "stage.batch_size_per_gpu=4", "stage.eval_every_n_steps=6"]
    args += ["stage.num_eval_batches=1", "sample.max_new_tokens=4", "tracking=none", "data.max_examples=64"]
    proc = run_train(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and list(summary["stages"]) == ["pretrain", "sft", "dpo"]
    config = next((run_dir / "dpo" / "checkpoints").glob("step_*/config.yaml")).read_text()
    assert f"init_from: {run_dir / 'sft'}" in config and "exp.stages.DPO" in config
    assert "val/rewards/accuracies" in (run_dir / "dpo" / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_init_from", "config error: stage: stage.init_from is required: DPO starts from a trained model"),
        ("empty_response", "config error: data.path={pairs}:2: the rejected response is empty"),
    ],
)
def test_bad_dpo_input_is_one_line_exit_2_and_writes_nothing(sft_run, tmp_path, case, message):
    pairs = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    pairs.write_text(good + "\n" + (json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": ""}) + "\n") * 2)
    if case != "empty_response":
        pairs.write_text((good + "\n") * 4)
    overrides = {
        "no_init_from": ["stage=dpo"],
        "empty_response": ["stage=dpo", f"stage.init_from={sft_run}", "data=preference_jsonl", f"data.path={pairs}"],
    }[case]
    run_dir = tmp_path / "run"
    proc = run_train(*SMALL, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(pairs=pairs)), proc.stderr
    assert not run_dir.exists()


def test_dpo_trains_a_lora_adapter_against_its_frozen_base(sft_run, tmp_path):
    pairs = pairs_file(tmp_path / "pairs.jsonl")
    run_dir = tmp_path / "dpo_lora"
    overrides = ["stage=dpo", f"stage.init_from={sft_run}", "data=preference_jsonl", f"data.path={pairs}"]
    overrides += ["+model/adapter=lora", "model.adapter.r=4", "stage.num_steps=6", "stage.learning_rate=1e-2"]
    train(run_dir, *TINY, "model.seq_len=128", *overrides)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "FINISHED"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert abs(metrics[0]["val/loss"] - math.log(2)) < 1e-6  # base + a zero LoRA update = the reference
    assert any(m.get("train/rewards/margins", 0) > 0 for m in metrics)
    saved = load_file(last_checkpoint(run_dir) / "model.safetensors")
    assert saved and all(".lora_" in k for k in saved)  # the adapter alone: neither the base nor the reference
