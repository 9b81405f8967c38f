"""The run directory: its lock, the atomic writer, summary.json and metrics.jsonl."""

import json

from exp.loop import TrainState
from exp.rundir import (
    MetricsFile,
    read_metrics,
    read_summary,
    write_atomic,
    write_json,
    write_summary,
)


def test_atomic_writes_leave_no_temporary_file_and_replace_whole(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"x": 1})
    write_atomic(path, "not json at all")
    assert path.read_text() == "not json at all" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_summary_reader_takes_what_the_writer_wrote_and_none_before_or_when_torn(tmp_path):
    assert read_summary(tmp_path) is None
    write_summary(tmp_path, {"status": "FINISHED", "val_loss": 1.5})
    assert read_summary(tmp_path) == {"status": "FINISHED", "val_loss": 1.5}
    (tmp_path / "summary.json").write_text('{"status": "FINI')  # a writer killed without write_atomic
    assert read_summary(tmp_path) is None


def test_metrics_file_drops_steps_past_a_resume_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "tr'
    )
    metrics = MetricsFile(path, keep_until_step=2)
    metrics.on_train_start(TrainState(step=2))
    metrics.on_log(TrainState(step=3), {"train/loss": 0.25})
    metrics.on_train_end(TrainState(step=3), "FINISHED")
    assert [(m["step"], m["train/loss"]) for m in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
