"""Shared fixtures: one torch thread, and the real config composed through Hydra's compose API."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
JSON_SOURCES = os.path.dirname(json.__file__)
# Small enough that an end-to-end run takes a second or two on one core.
TINY = [
    "model=gpt_tiny",
    "model.n_layer=2",
    "model.d_model=64",
    "model.seq_len=32",
    "hardware=cpu",
    "stage.num_steps=4",
    "stage.batch_size_per_gpu=4",
    "stage.log_every_n_steps=2",
    "stage.eval_every_n_steps=2",
    "stage.num_eval_batches=2",
    "sample.max_new_tokens=8",
    "tracking=none",
]


# The end-to-end files that take longest, started first: the suite runs on two workers, a file each at a time
# (-n 2 --dist loadfile), and a long file handed out last would run alone at the end (docs/testing.md).
LONGEST_FIRST = (
    "test_optuna_sweeper.py",
    "test_tracking.py",
    "test_eval_runs.py",
    "test_slurm_sweeps.py",
    "test_dist.py",
    "test_dist_resume.py",
    "test_serve_slurm.py",
    "test_pipeline.py",
    "test_serve_e2e.py",
    "test_train.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.path).name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory):
    """One stdlib corpus for the whole session, outside the user's cache."""
    path = os.environ.get("EXP_TEST_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))
    os.environ["EXP_CACHE_DIR"] = path
    return Path(path)


def compose_train(*overrides: str, run_dir: Path) -> DictConfig:
    """The config train.py would get for these overrides, with the run dir redirected."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run_dir}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:runtime.choices.*} resolves
    with open_dict(cfg):
        del cfg["hydra"]  # the job sees no hydra node, as under @hydra.main
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    return lambda *overrides: compose_train(*TINY, *overrides, run_dir=tmp_path / "run")


def run_train(*overrides: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """train.py in a subprocess, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_export(path: Path, **model_kw) -> Path:
    """An exported model folder (config.yaml + model.safetensors) of a tiny GPT: a teacher or init for tests."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    from exp.model import GPT

    cfg = {
        "_target_": "exp.model.GPT",
        "vocab_size": 264,
        "seq_len": 32,
        "n_layer": 2,
        "n_head": 2,
        "d_model": 64,
        **model_kw,
    }
    torch.manual_seed(1)
    model = GPT(**{k: v for k, v in cfg.items() if k != "_target_"})
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / "model.safetensors"))
    (path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few small, real text files (the json package's sources) and a file of special-token strings."""
    d = tmp_path_factory.mktemp("src")
    for name in sorted(os.listdir(JSON_SOURCES)):
        if name.endswith(".py"):
            shutil.copy(os.path.join(JSON_SOURCES, name), d / name)
    (d / "specials.txt").write_text("a <|endoftext|> literal and caf\u00e9 \u2603 stay text\n" * 40)
    return d
