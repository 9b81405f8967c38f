"""stage.num_epochs instead of stage.num_steps, progress/epoch in the logs, and data.max_examples for every data."""

import json
import math

import numpy as np
import pytest
from hydra.utils import instantiate

import exp.run
from exp.config import validate
from exp.data.corpus import write_token_files
from exp.errors import ConfigError
from exp.rundir import read_metrics

from ..conftest import TINY as TINY_STEPS
from ..conftest import compose_train

TINY = [o for o in TINY_STEPS if not o.startswith("stage.num_steps=")]  # num_epochs sets them


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "data"
    rng = np.random.default_rng(0)
    docs = ((f"doc{i}", rng.integers(0, 256, 400).astype(np.uint16)) for i in range(20))
    write_token_files(docs, out, 0.1)
    return out


def test_num_epochs_derives_num_steps_from_the_data(tokens_dir, tmp_path):
    cfg = compose_train(*TINY, "data=memmap", f"data.path={tokens_dir}", "stage.num_epochs=1.5", run_dir=tmp_path / "r")
    validate(cfg)
    size = instantiate(cfg.data).epoch_size()
    train_tokens = json.loads((tokens_dir / "meta.json").read_text())["num_train_tokens"]
    assert size == (train_tokens - 1) // 32  # windows of model.seq_len=32
    assert cfg.stage.num_steps == math.ceil(1.5 * size / 4) and cfg.scheduler.num_steps == cfg.stage.num_steps


def test_num_epochs_and_num_steps_together_are_one_error(tokens_dir, tmp_path):
    cfg = compose_train(
        *TINY, "data=memmap", f"data.path={tokens_dir}", "stage.num_epochs=1", "stage.num_steps=9", run_dir=tmp_path
    )
    with pytest.raises(ConfigError, match=r"^stage\.num_steps=9 and stage\.num_epochs=1 are both set"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"stage\.num_epochs=-1 must be a number > 0"):
        validate(compose_train(*TINY, "stage.num_epochs=-1", run_dir=tmp_path))


def test_max_examples_limits_every_data_option(tokens_dir, tmp_path):
    memmap = instantiate(
        compose_train(*TINY, "data=memmap", f"data.path={tokens_dir}", "data.max_examples=5", run_dir=tmp_path).data
    )
    assert memmap.epoch_size() == 5 and len(memmap.arrays()[0]) == 5 * 32 + 1
    sft_cfg = compose_train(*TINY, "stage=sft", "data.max_examples=12", "model.seq_len=128", run_dir=tmp_path)
    sft = instantiate(sft_cfg.data)
    assert sft.stats()["num_train_examples"] <= 12 and sft.epoch_size() == sft.stats()["num_train_examples"]
    with pytest.raises(ConfigError, match=r"data\.max_examples must be > 0 or null, got 0"):
        validate(compose_train(*TINY, "data.max_examples=0", run_dir=tmp_path))


def test_the_epoch_is_logged(tokens_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train(
        *TINY, "data=memmap", f"data.path={tokens_dir}", "data.max_examples=8", "stage.num_epochs=2", run_dir=run_dir
    )
    exp.run.train(cfg)
    logged = [r for r in read_metrics(run_dir / "metrics.jsonl") if "progress/epoch" in r]
    assert cfg.stage.num_steps == 4 and logged  # 2 epochs of 8 windows, 4 per step
    assert logged[-1]["progress/epoch"] == pytest.approx(2.0)


def test_num_steps_null_beside_num_epochs_counts_as_not_set(tokens_dir, tmp_path):
    cfg = compose_train(
        *TINY, "data=memmap", f"data.path={tokens_dir}", "stage.num_epochs=1", "stage.num_steps=null", run_dir=tmp_path
    )
    validate(cfg)
    assert cfg.stage.num_steps == math.ceil(instantiate(cfg.data).epoch_size() / 4)
