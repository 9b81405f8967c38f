"""The end-to-end cases of tests/unit/test_data.py: those that start a process or run a training
job."""

import json

import pytest

from exp.data.prepare import main as prepare_main

from ..conftest import TINY, run_train
from ..unit.test_data import write_tokens  # noqa: F401


def test_prepare_single_file_splits_by_tokens_and_trains(tmp_path, capsys):
    book = tmp_path / "book.txt"  # one file, like tiny Shakespeare: once refused as "need at least 2 documents"
    book.write_text("To be, or not to be, that is the question.\n" * 1200)
    out = tmp_path / "tokens"
    assert prepare_main([str(book), "--out", str(out), "--val-fraction", "0.1"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("prepared 1 document: split by tokens, last 10% to val: 46440 train / 5161 val tokens")
    run_dir = tmp_path / "run"
    proc = run_train(
        *TINY, "data=memmap", f"data.path={out}", "stage.num_steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 2 and summary["val_loss"] > 0


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.path=raw"], "data.path=raw/train.bin holds token id 300 >= data.vocab_size=264"),
        (["data.path=short"], "data.path=short/val.bin holds 10 tokens, fewer than one window of data.seq_len=32"),
        (["data.path=short", "data.val_path=short/val.bin"], "data.path=short is a directory; with data.val_path set"),
    ],
    ids=["token-id", "short-val", "directory"],
)
def test_bad_token_files_exit_2_in_validation_and_write_nothing(tmp_path, overrides, needle):
    for name, train, val in (("raw", [*range(200), 300], range(100)), ("short", range(200), range(10))):
        (tmp_path / name).mkdir()
        write_tokens(tmp_path / name / "train.bin", train)
        write_tokens(tmp_path / name / "val.bin", val)
    run_dir = tmp_path / "run"
    proc = run_train(*TINY, "data=memmap", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not run_dir.exists()
