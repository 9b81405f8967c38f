"""The end-to-end cases of tests/unit/test_sft_data.py: those that start a process or run a training
job."""

import json

import pytest

from ..conftest import TINY, run_train
from ..unit.test_sft_data import qa  # noqa: F401


@pytest.mark.parametrize(
    "lines,needle",
    [
        ([json.dumps(qa(1)), json.dumps(qa(2)), "{oops"], "chat.jsonl:3: not valid JSON ("),
        ([json.dumps(qa(1)), json.dumps({"a": 1, "b": 2})], "chat.jsonl:2: no recognisable format in keys [a, b]"),
        (
            [json.dumps({"prompt": "p" * 40, "response": "r"})] * 4,
            "all 4 train examples were dropped at data.seq_len=32",
        ),
    ],
    ids=["not-json", "no-format", "all-dropped"],
)
def test_bad_sft_data_exits_2_in_validation_and_writes_nothing(tmp_path, lines, needle):
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    overrides = ["stage=sft", "data=sft_jsonl", "data.path=chat.jsonl", "data.val_path=chat.jsonl"]
    proc = run_train(*TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines_out = proc.stderr.strip().splitlines()
    assert len(lines_out) == 1 and lines_out[0].startswith("config error: data.path=chat.jsonl"), proc.stderr
    assert needle in lines_out[0]
    assert not run_dir.exists()
