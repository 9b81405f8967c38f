"""eval=lm_eval in real runs: scores in every record of the run, python -m exp.eval on its checkpoints, agreement
with `lm_eval --model hf` on its export, 2-rank runs, and bad input refused before training."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from exp.config import ConfigError, validate
from exp.eval.cli import main as eval_main
from exp.rundir import read_metrics

from ..conftest import ROOT, TINY, compose_train, run_train
from .test_dist import torchrun

TASKS = "eval.tasks=[exp_stdlib_mc,exp_stdlib_ppl]"
EVAL = ["eval=lm_eval", TASKS, "eval.limit=30", "model.seq_len=128"]
RUN = [*TINY, *EVAL, "stage.num_steps=20", "stage.eval_every_n_steps=10", "eval.every_n_steps=10"]
RUN += ["checkpoint.every_n_steps=10", "checkpoint.keep_last=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli(*args, module="exp.eval", cwd=None, env=ENV):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of 20 steps evaluated at 10 and 20, recorded in an MLflow store of its own."""
    tmp = tmp_path_factory.mktemp("evalrun")
    uri = f"sqlite:///{tmp}/mlflow.db"
    proc = run_train(*RUN, "tracking=mlflow", f"tracking.uri={uri}", f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", uri, proc


def test_scores_reach_metrics_summary_mlflow_the_console_and_the_eval_folder(run):
    run_dir, uri, proc = run
    rows = [m for m in read_metrics(run_dir / "metrics.jsonl") if "eval/exp_stdlib_mc/acc" in m]
    assert [m["step"] for m in rows] == [10, 20]
    assert all(0 <= m["eval/exp_stdlib_mc/acc"] <= 1 and m["eval/exp_stdlib_ppl/bits_per_byte"] > 0 for m in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval"]["step"] == 20
    assert summary["eval"]["metrics"]["eval/exp_stdlib_mc/acc"] == rows[-1]["eval/exp_stdlib_mc/acc"]
    client = MlflowClient(uri)
    history = client.get_metric_history(summary["mlflow_run_id"], "eval/exp_stdlib_mc/acc_norm")
    assert [(h.step, h.value) for h in history] == [(m["step"], m["eval/exp_stdlib_mc/acc_norm"]) for m in rows]
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "eval")}
    assert artifacts == {"eval/step_00000010.json", "eval/step_00000020.json"}
    saved = json.loads((run_dir / "eval" / "step_00000020.json").read_text())
    assert saved["results"]["exp_stdlib_mc"]["acc,none"] == rows[-1]["eval/exp_stdlib_mc/acc"]
    assert "tasks 20/20 | exp_stdlib_mc | acc " in proc.stdout + proc.stderr
    assert "it/s]" not in proc.stdout + proc.stderr  # no progress bars of the harness in the run's log
    # evaluation is not training time: steady throughput is computed from the steps alone
    assert summary["train_seconds"] < summary["wall_seconds"]


def test_eval_cli_scores_every_checkpoint_skips_broken_ones_and_logs_the_curve(run, tmp_path):
    run_dir, uri, _ = run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
    (copy / "checkpoints" / ".step_00000015.tmp-4242").mkdir()  # a save in flight
    corrupt = copy / "checkpoints" / "step_00000010" / "model.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:-8] + b"\0" * 8)
    summary = json.loads((copy / "summary.json").read_text())
    before = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "eval/exp_stdlib_mc/acc")
    proc = cli(str(copy), "--all-checkpoints", "--tasks", "exp_stdlib_mc", "--limit", "30")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped" in proc.stderr and ".step_00000015.tmp-4242" in proc.stderr
    assert "step_00000010" in proc.stderr.split("tmp-4242")[1]  # the corrupt one, named
    assert "(step 20)" in proc.stdout and "|exp_stdlib_mc|" in proc.stdout and "chance: acc 0.25" in proc.stdout
    after = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "eval/exp_stdlib_mc/acc")
    assert len(after) == len(before) + 1 and max(h.step for h in after) == 20
    assert MlflowClient(uri).get_run(summary["mlflow_run_id"]).info.status == "FINISHED"  # a record, not a rerun
    # the CLI scores the checkpoint exactly as the run did in its loop
    assert sorted(h.value for h in after if h.step == 20) == [before[-1].value] * 2


def test_lm_eval_hf_on_the_export_agrees_with_exps_adapter(run, tmp_path):
    run_dir, _, _ = run
    assert cli(str(run_dir), str(tmp_path / "hf"), "--format", "hf", module="exp.export").returncode == 0
    out = tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [
            sys.executable, "-m", "lm_eval", "--model", "hf",
            "--model_args", f"pretrained={tmp_path / 'hf'},dtype=float32",
            "--include_path", str(ROOT / "exp" / "eval" / "tasks"),
            "--tasks", "exp_stdlib_mc,exp_stdlib_ppl", "--limit", "30", "--device", "cpu", "--batch_size", "8",
            "--log_samples", "--output_path", str(out),
        ],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.split("_20")[0].removeprefix("samples_")
        theirs[task] = {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}
    ours = json.loads((run_dir / "eval" / "step_00000020.json").read_text())  # what the loop scored
    (results_file,) = out.rglob("results_*.json")
    reference = json.loads(results_file.read_text())["results"]
    for task in ("exp_stdlib_mc", "exp_stdlib_ppl"):
        for metric, value in reference[task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    # python -m exp.eval reads the HF export as well (its tokenizer included) and scores it the same
    scored = tmp_path / "hf_scores.json"
    proc = cli(str(tmp_path / "hf"), "--tasks", "exp_stdlib_mc", "--limit", "30", "--output", str(scored))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(scored.read_text())["results"]["exp_stdlib_mc"] == pytest.approx(ours["results"]["exp_stdlib_mc"])
    # per example: exp's adapter on the checkpoint, in process, against the harness's samples
    import torch
    from lm_eval import simple_evaluate

    from exp.checkpoint import load_model_for_inference
    from exp.eval import harness
    from exp.eval.adapter import ExpLM
    from exp.generate import model_tokenizer

    model, _ = load_model_for_inference(run_dir, torch.device("cpu"))
    lm = ExpLM(model, model_tokenizer(run_dir, model), batch_size=7)
    spec = harness.Spec(tasks=["exp_stdlib_mc", "exp_stdlib_ppl"], limit=30)
    manager = harness.check_tasks(spec)
    got = simple_evaluate(model=lm, tasks=spec.tasks, limit=30, task_manager=manager, log_samples=True)
    for task, samples in got["samples"].items():
        assert len(samples) == len(theirs[task]) > 0
        for s in samples:
            want = (
                [float(r[0]) for r in theirs[task][s["doc_id"]]["filtered_resps"]]
                if task == "exp_stdlib_mc"
                else [float(r) for r in theirs[task][s["doc_id"]]["filtered_resps"]]
            )
            have = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in s["filtered_resps"]]
            assert have == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_share_the_requests_and_score_as_one_process(tmp_path, strategy):
    proc = torchrun(
        f"hardware={strategy}", *TINY[:1], "model.n_layer=2", "model.d_model=64", "hardware.device=cpu",
        "hardware.num_threads=1", "stage.num_steps=6", "stage.batch_size_per_gpu=2", "tracking=none",
        "sample.max_new_tokens=0", *EVAL, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/exp_stdlib_mc/acc" in m]
    out = tmp_path / "one.json"
    args = ["--tasks", "exp_stdlib_mc,exp_stdlib_ppl", "--limit", "30", "--no-record", "--output", str(out)]
    one = cli(str(tmp_path / "run"), *args)
    assert one.returncode == 0, one.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert row["eval/exp_stdlib_mc/acc"] == results["exp_stdlib_mc"]["acc,none"]
    assert row["eval/exp_stdlib_ppl/bits_per_byte"] == pytest.approx(results["exp_stdlib_ppl"]["bits_per_byte,none"])
    assert [p.name for p in (tmp_path / "run" / "eval").iterdir()] == ["step_00000006.json"]  # --no-record


def test_bad_eval_input_is_one_line_exit_2_before_anything_is_written(tmp_path, capsys):
    bad = tmp_path / "tasks"
    bad.mkdir()
    (bad / "mine.yaml").write_text("task: mine\nmetric_list: [acc\n")
    no_lm_eval = tmp_path / "shim" / "lm_eval"
    no_lm_eval.mkdir(parents=True)
    (no_lm_eval / "__init__.py").write_text("raise ImportError('No module named lm_eval')\n")
    cases = [
        (["eval=lm_eval", f"eval.include_path={bad}"], ENV, "mine.yaml line 3: not a task YAML"),
        (["eval=lm_eval"], {**ENV, "PYTHONPATH": f"{no_lm_eval.parent}:{ROOT}"}, "lm-eval is not installed"),
    ]
    for i, (overrides, env, message) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *TINY, *overrides, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and message in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
        assert not run_dir.exists()
    # an unknown task: the same check, in this process (train.py's validation, then exp.eval's command line)
    with pytest.raises(ConfigError, match="eval.tasks: unknown task 'no_such_task'"):
        validate(compose_train(*TINY, "eval=lm_eval", "eval.tasks=[no_such_task]", run_dir=tmp_path / "run"))
    assert eval_main([str(tmp_path), "--tasks", "no_such_task"]) == 2
    assert "--tasks: unknown task 'no_such_task'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no sbatch: run scripts/slurm-local.sh")
def test_slurm_side_jobs_score_each_checkpoint_into_the_run_while_training_goes_on(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    side = ["eval=lm_eval", "eval.launcher=slurm", "eval.limit=3", "eval.slurm={cpus_per_task:1,mem_gb:1}"]
    common = [*TINY, "checkpoint.every_n_steps=2", "checkpoint.keep_last=1", "tracking=mlflow", f"tracking.uri={uri}"]
    good, bad = tmp_path / "good", tmp_path / "bad"
    proc = run_train(*common, *side, "eval.tasks=[exp_stdlib_ppl]", f"hydra.run.dir={good}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation of step 2: SLURM job" in proc.stdout + proc.stderr
    # exp_stdlib_mc's continuations do not fit a 32-token context: that job fails, the run is not touched
    failing = run_train(*common, *side, "eval.tasks=[exp_stdlib_mc]", f"hydra.run.dir={bad}", cwd=tmp_path)
    assert failing.returncode == 0, failing.stderr[-3000:]
    deadline = time.time() + 240
    wanted = [good / "eval" / "step_00000002.json", good / "eval" / "step_00000004.json"]
    wanted += [bad / "eval" / "step_00000004.failed"]
    while not all(p.exists() for p in wanted):
        assert time.time() < deadline, sorted(str(p) for p in tmp_path.rglob("eval/*"))
        time.sleep(1)
    summary = json.loads((good / "summary.json").read_text())
    history = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "eval/exp_stdlib_ppl/bits_per_byte")
    assert sorted(h.step for h in history) == [2, 4]
    assert [p.name for p in (good / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_00000004"]
    assert not list((good / "eval" / "pending").iterdir())  # each job removed its hard links
    assert [j["step"] for j in json.loads((good / "eval" / "jobs.json").read_text())] == [2, 4]
    assert "longer than the model's context" in (bad / "eval" / "step_00000004.failed").read_text()
    assert json.loads((bad / "summary.json").read_text())["status"] == "FINISHED"
