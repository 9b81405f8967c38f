"""Where the repository's own files are: the one home of these paths (the job service, the sweep CLI, repeat, the
pipeline and the git tag all need them)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"  # the config groups train.py composes from
TRAIN_PY = REPO_ROOT / "train.py"
