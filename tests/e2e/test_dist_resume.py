"""Resuming at another number of ranks, with real torchrun gloo jobs: a run handed from 2 ranks to 1 and back (FSDP on
token windows, DDP on SFT examples, whose 2-rank resume is there too) consumes the very data stream an uninterrupted
run draws and its loss curve goes on; a changed global batch continues the stream from the samples consumed and is
recorded. Each chain is one run directory through several launches; the references are single processes (every
row has as many targets, so a mean of the ranks' mean losses is the single process's loss)."""

import json

import pytest
from hydra.utils import instantiate

import exp.job

from ..conftest import compose_train
from ..hooks import row_digests
from .test_dist import COMMON, losses, torchrun

pytestmark = pytest.mark.slow

NUM_STEPS = 8
BASE = [*COMMON, f"stage.num_steps={NUM_STEPS}", "stage.eval_every_n_steps=4", "stage.num_eval_batches=2"]
STOP = ["+callbacks.stop._target_=tests.hooks.SignalAt"]


def record(prefix) -> list[str]:
    return ["+callbacks.rec._target_=tests.hooks.RecordBatches", f"+callbacks.rec.path={prefix}"]


def run_chain(base, hardware, data, legs) -> dict:
    """One run directory through `legs` of (ranks, batch_size_per_gpu, stop step or None, extra overrides)."""
    run_dir, prefix = base / "run", base / "rows"
    procs = []
    for nproc, batch, stop, extra in legs:
        stopping = [*STOP, f"+callbacks.stop.step={stop}"] if stop else []
        args = [hardware, *BASE, *data, f"stage.batch_size_per_gpu={batch}", f"hydra.run.dir={run_dir}"]
        procs.append(torchrun(*args, *record(prefix), *stopping, *extra, cwd=base, nproc=nproc))
        assert (procs[-1].returncode == 0) == (stop is None), procs[-1].stderr[-3000:]
    return {"run_dir": run_dir, "prefix": prefix, "procs": procs}


def consumed(prefix) -> dict[int, list[str]]:
    """Each step's rows in the global stream's order (rank 0's share first), from every rank's record."""
    shares: dict[int, list[tuple[int, list[str]]]] = {}
    for rank in range(2):
        path = prefix.parent / f"{prefix.name}.{rank}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            entry = json.loads(line)
            shares.setdefault(entry["step"], []).append((rank, entry["rows"]))
    return {step: [row for _, rows in sorted(parts) for row in rows] for step, parts in sorted(shares.items())}


def reference(base, data) -> dict:
    """The uninterrupted run: one process of batch 8, in this process; and the data's stream, one row at a time."""
    run_dir = base / "reference"
    cfg = compose_train(
        "hardware=cpu", *BASE, *data, "stage.batch_size_per_gpu=8", *record(base / "ref"), run_dir=run_dir
    )
    exp.job.run_job(cfg)
    sampler = instantiate(cfg.data).train_sampler(1, seed=cfg.seed)
    stream = [row for _ in range(NUM_STEPS * 16) for row in row_digests(next(sampler))]
    return {"run_dir": run_dir, "rows": consumed(base / "ref"), "stream": stream}


def changes(run_dir) -> dict[int, dict]:
    return {entry["step"]: entry["changes"] for entry in json.loads((run_dir / "config_changes.json").read_text())}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """A small chat set of short prompt/response records (rows fit model.seq_len=32), each answer as long."""
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    records = [{"prompt": "q" * (i % 9) + f"{i}?", "response": f"a{i:03d}"} for i in range(90)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return ["stage=sft", "data=sft_jsonl", f"data.path={path}", "data.val_fraction=0.2", "stage.eval_at_start=false"]


@pytest.fixture(scope="module")
def tokens_fsdp(tmp_path_factory):
    """FSDP on token windows: 2 ranks x 4, stopped at 2; 1 rank x 8 to 4; then 2 x 8 (global batch 16) to the end."""
    base = tmp_path_factory.mktemp("tokens_fsdp")
    legs = [(2, 4, 2, []), (1, 8, 4, []), (2, 8, None, ["resume.allow_config_change=true"])]
    return run_chain(base, "hardware=fsdp", [], legs), reference(base, [])


@pytest.fixture(scope="module")
def sft_ddp(tmp_path_factory, sft_data):
    """DDP on SFT examples: 2 ranks x 4, stopped at 2; again 2 x 4 to 4; 1 rank x 8 to 6; 2 x 4 to the end."""
    base = tmp_path_factory.mktemp("sft_ddp")
    legs = [(2, 4, 2, []), (2, 4, 4, []), (1, 8, 6, []), (2, 4, None, [])]
    return run_chain(base, "hardware=ddp", sft_data, legs), reference(base, sft_data)


def test_fsdp_token_windows_resume_at_one_rank_and_back_on_the_same_stream(tokens_fsdp):
    chain, ref = tokens_fsdp
    rows = consumed(chain["prefix"])
    assert list(rows) == list(range(1, NUM_STEPS + 1))
    assert [rows[s] for s in range(1, 5)] == [ref["rows"][s] for s in range(1, 5)]  # global batch 8 kept
    assert [r for s in rows for r in rows[s]] == ref["stream"][: 4 * 8 + 4 * 16]  # then 16 a step, from row 32 on
    assert [r for s in ref["rows"] for r in ref["rows"][s]] == ref["stream"][: NUM_STEPS * 8]
    resumed, straight = losses(chain["run_dir"]), losses(ref["run_dir"])
    assert resumed[:4] == pytest.approx(straight[:4], rel=1e-4)  # step 3 ran right after a resume
    assert changes(chain["run_dir"]) == {
        2: {
            "world_size": [2, 1],
            "strategy": ["fsdp", "none"],
            "stage.batch_size_per_gpu": [4, 8],
            "global_batch": [8, 8],
        },
        4: {"world_size": [1, 2], "strategy": ["none", "fsdp"], "global_batch": [8, 16]},
    }
    log = chain["procs"][2].stdout + chain["procs"][2].stderr
    assert "strategy none -> fsdp; global batch 8 -> 16: the data continues from the samples consumed" in log
    summary = json.loads((chain["run_dir"] / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["tokens_seen"] == (4 * 8 + 4 * 16) * 32


def test_ddp_sft_resumes_at_two_ranks_then_one_and_back_on_the_same_stream(sft_ddp):
    chain, ref = sft_ddp
    rows = consumed(chain["prefix"])
    assert rows == ref["rows"]  # every step's examples, in order, whatever the ranks
    assert [r for s in rows for r in rows[s]] == ref["stream"][: NUM_STEPS * 8]
    assert len(set(ref["stream"][:8])) == 8  # distinct rows: the comparison has teeth
    assert "resumed from" in chain["procs"][1].stderr + chain["procs"][1].stdout  # 2 ranks -> 2 ranks
    resumed, straight = losses(chain["run_dir"]), losses(ref["run_dir"])
    assert resumed == pytest.approx(straight, rel=1e-4)
    assert changes(chain["run_dir"]) == {
        4: {
            "world_size": [2, 1],
            "strategy": ["ddp", "none"],
            "stage.batch_size_per_gpu": [4, 8],
            "global_batch": [8, 8],
        },
        6: {
            "world_size": [1, 2],
            "strategy": ["none", "ddp"],
            "stage.batch_size_per_gpu": [8, 4],
            "global_batch": [8, 8],
        },
    }
    assert json.loads((chain["run_dir"] / "summary.json").read_text())["status"] == "FINISHED"


def test_a_refused_two_rank_resume_leaves_the_finished_runs_record_as_it_was(tmp_path):
    """Under torchrun too: a resume that cannot load (another model shape, allowed as a config change) fails on
    both ranks and leaves summary.json, metrics.jsonl, the checkpoints and the MLflow run (FINISHED, its end time,
    no new run) exactly as the finished run left them."""
    from mlflow.tracking import MlflowClient

    store, run_dir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    args = ["hardware=ddp", *BASE, "stage.batch_size_per_gpu=4", "tracking=mlflow", f"tracking.uri={store}"]
    first = torchrun(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]

    def record():
        client = MlflowClient(tracking_uri=store)
        run = client.get_run(json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"])
        files = [run_dir / "summary.json", run_dir / "metrics.jsonl", *sorted((run_dir / "checkpoints").rglob("*"))]
        runs = len(client.search_runs([run.info.experiment_id]))
        return {str(p): p.read_bytes() for p in files if p.is_file()}, (run.info.status, run.info.end_time), runs

    before = record()
    assert before[1][0] == "FINISHED"
    again = torchrun(
        *args, f"hydra.run.dir={run_dir}", "model.n_layer=3", "resume.allow_config_change=true", cwd=tmp_path
    )
    assert again.returncode != 0
    assert "cannot resume from" in again.stderr, again.stderr[-3000:]
    assert record() == before
