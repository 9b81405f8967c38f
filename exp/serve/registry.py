"""The service's small registry (SQLite beside the runs): stored configs, and the jobs it started or found.

It holds only what the run directories cannot say: which process or SLURM job runs a job, its overrides, and
whether a stop was asked for. Status, metrics and checkpoints are read from the run directory every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from exp.rundir import SUMMARY

DB_NAME = "serve.db"
MLFLOW_DB = "mlflow.db"  # the embedded store train.py uses: runs/mlflow.db
SCHEMA = """
CREATE TABLE IF NOT EXISTS configs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, overrides TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, run_dir TEXT UNIQUE NOT NULL, source TEXT NOT NULL, launcher TEXT NOT NULL,
    overrides TEXT NOT NULL, config_id TEXT, created REAL NOT NULL,
    pid INTEGER, pid_start TEXT, slurm_job_id TEXT, log_path TEXT, stop_requested INTEGER DEFAULT 0,
    launches INTEGER DEFAULT 1, launched REAL
);
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY, sweep_dir TEXT UNIQUE NOT NULL, created REAL NOT NULL,
    pid INTEGER, pid_start TEXT, log_path TEXT, launched REAL
);
"""
# columns added since the first release, added to an older serve.db when it is opened
LATER_COLUMNS = {
    "mlflow_run_id": "TEXT",
    "tracking_uri": "TEXT",
    "ahead_closed": "INTEGER DEFAULT 0",
    "slurm_resources": "TEXT",  # JSON: the SLURM resources the client asked for, kept for a resume
    "ended_launch": "INTEGER DEFAULT 0",  # the launch whose ending by a signal the service has recorded
    "sweep_id": "TEXT",  # the sweep a trial's run directory belongs to (source 'sweep')
}


def new_id(prefix: str) -> str:
    """A sortable, URL-safe id: prefix, UTC time, 4 random hex digits."""
    return f"{prefix}{time.strftime('%Y%m%d%H%M%S', time.gmtime())}{secrets.token_hex(2)}"


def run_id_for(run_dir: Path) -> str:
    """The id of a run directory the service did not start: stable across restarts."""
    return "r" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


class Registry:
    """One SQLite file, used from the server's threads through one connection under a lock."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.runs_dir / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for name, kind in LATER_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        self._scanned = 0.0

    def _all(self, sql: str, args=()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _run(self, sql: str, args=()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # --- configs --------------------------------------------------------------------------------------

    def add_config(self, name: str, overrides: list[str]) -> dict:
        row = {"id": new_id("c"), "name": name, "overrides": overrides, "created": time.time()}
        self._run("INSERT INTO configs VALUES (?, ?, ?, ?)", (row["id"], name, json.dumps(overrides), row["created"]))
        return row

    def configs(self) -> list[dict]:
        return [_config(r) for r in self._all("SELECT * FROM configs ORDER BY created")]

    def config(self, config_id: str) -> dict | None:
        rows = self._all("SELECT * FROM configs WHERE id = ?", (config_id,))
        return _config(rows[0]) if rows else None

    def delete_config(self, config_id: str) -> bool:
        return self._run("DELETE FROM configs WHERE id = ?", (config_id,)) > 0

    # --- jobs -----------------------------------------------------------------------------------------

    def add_job(self, job_id: str, run_dir: Path, *, launcher: str, overrides: list[str], config_id=None, **process):
        # a scan may have found the run directory first (its .hydra appears as the job starts): the job is ours
        self._run("DELETE FROM jobs WHERE run_dir = ? AND source = 'cli'", (str(run_dir),))
        self._run(
            "INSERT INTO jobs (id, run_dir, source, launcher, overrides, config_id, created, pid, pid_start, "
            "slurm_job_id, log_path, launched, mlflow_run_id, tracking_uri, slurm_resources) "
            "VALUES (?, ?, 'service', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                str(run_dir),
                launcher,
                json.dumps(overrides),
                config_id,
                time.time(),
                process.get("pid"),
                process.get("pid_start"),
                process.get("slurm_job_id"),
                process.get("log_path"),
                process.get("launched", time.time()),
                process.get("mlflow_run_id"),
                process.get("tracking_uri"),
                json.dumps(process.get("slurm_resources") or {}),
            ),
        )

    def relaunched(self, job_id: str, *, launcher: str, overrides: list[str], **process) -> None:
        """A job started again in its run directory (resumed): its new process, and stop no longer asked."""
        self._run(
            "UPDATE jobs SET source='service', launcher=?, overrides=?, pid=?, pid_start=?, slurm_job_id=?, "
            "log_path=?, launched=?, slurm_resources=?, stop_requested=0, launches=launches+1 WHERE id=?",
            (
                launcher,
                json.dumps(overrides),
                process.get("pid"),
                process.get("pid_start"),
                process.get("slurm_job_id"),
                process.get("log_path"),
                process.get("launched", time.time()),
                json.dumps(process.get("slurm_resources") or {}),
                job_id,
            ),
        )

    def mark_stop_requested(self, job_id: str) -> None:
        self._run("UPDATE jobs SET stop_requested=1 WHERE id=?", (job_id,))

    def claim_ahead_close(self, job_id: str) -> bool:
        """True for the one caller that is to close the MLflow run created ahead of the job (the job ended before
        taking it); False for every later one."""
        return self._run("UPDATE jobs SET ahead_closed=1 WHERE id=? AND ahead_closed=0", (job_id,)) == 1

    def claim_ending(self, job_id: str) -> bool:
        """True for the one caller that is to record how the job's latest launch ended (killed by a signal: its
        summary.json and MLflow run); False for every later one, until the job is launched again."""
        sql = "UPDATE jobs SET ended_launch=launches WHERE id=? AND COALESCE(ended_launch, 0) < launches"
        return self._run(sql, (job_id,)) == 1

    def service_jobs(self) -> list[dict]:
        """The jobs this service started (no scan for runs started from the command line)."""
        return [_job(r) for r in self._all("SELECT * FROM jobs WHERE source = 'service' ORDER BY created DESC")]

    def jobs(self) -> list[dict]:
        self.discover()
        return [_job(r) for r in self._all("SELECT * FROM jobs ORDER BY created DESC")]

    def job(self, job_id: str) -> dict | None:
        rows = self._all("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows and job_id.startswith("r"):  # a CLI run that appeared since the last scan
            self.discover(force=True)
            rows = self._all("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    # --- sweeps ---------------------------------------------------------------------------------------

    def add_sweep(self, sweep_id: str, sweep_dir: Path, **process) -> None:
        """A sweep this service started, or the process it started for one (resume, rerun-failed)."""
        self._run(
            "INSERT INTO sweeps (id, sweep_dir, created, pid, pid_start, log_path, launched) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET pid=excluded.pid, "
            "pid_start=excluded.pid_start, log_path=excluded.log_path, launched=excluded.launched",
            (
                sweep_id,
                str(sweep_dir),
                time.time(),
                process.get("pid"),
                process.get("pid_start"),
                process.get("log_path"),
                time.time(),
            ),
        )

    def sweeps(self) -> list[dict]:
        return self._all("SELECT * FROM sweeps ORDER BY created")

    def sweep(self, sweep_id: str) -> dict | None:
        rows = self._all("SELECT * FROM sweeps WHERE id = ?", (sweep_id,))
        return rows[0] if rows else None

    def sweep_dirs(self) -> dict[str, Path]:
        """Sweep directories by id: the service's own (their folder's name) and those found under the runs directory
        (four levels deep, a hash of their path)."""
        found = {run_id_for(p).replace("r", "s", 1): p for p in _sweep_dirs(self.runs_dir)}
        started = {s["id"]: Path(s["sweep_dir"]) for s in self.sweeps()}
        return {**started, **{i: p for i, p in found.items() if p not in started.values()}}

    def discover(self, force: bool = False, every_s: float = 2.0) -> None:
        """Register run directories started from the command line (a `.hydra/` folder under the runs directory) and
        the trials of every sweep there (its numbered run directories, with the sweep's id), at most every `every_s`
        seconds unless forced."""
        now = time.monotonic()
        if not force and now - self._scanned < every_s:
            return
        self._scanned = now
        known = {r["run_dir"] for r in self._all("SELECT run_dir FROM jobs")}
        tracked = [Path(d) / ".hydra" for d in mlflow_run_dirs(self.runs_dir / MLFLOW_DB)]
        for hydra_dir in [*_hydra_dirs(self.runs_dir), *(h for h in tracked if h.is_dir())]:
            run_dir = hydra_dir.parent.resolve()
            if str(run_dir) not in known and not _in_sweep(run_dir):  # a trial is registered with its sweep below
                self._register(run_dir)
        for sweep_id, sweep_dir in self.sweep_dirs().items():
            for run_dir in _trial_dirs(sweep_dir):
                if str(run_dir) not in known:
                    self._register(run_dir, sweep_id)

    def _register(self, run_dir: Path, sweep_id: str | None = None) -> None:
        """A run directory found on disk, once it has started (a config error's leftovers, or a run still starting,
        wait for the next scan)."""
        hydra_dir = run_dir / ".hydra"
        if not (run_dir / SUMMARY).exists() and not (run_dir / "metrics.jsonl").exists():
            if not (run_dir / ".lock").exists():
                return
        overrides = _read_overrides(hydra_dir / "overrides.yaml")
        created = (hydra_dir / "config.yaml").stat().st_mtime if (hydra_dir / "config.yaml").exists() else 0
        self._run(
            "INSERT OR IGNORE INTO jobs (id, run_dir, source, launcher, overrides, created, sweep_id) "
            "VALUES (?, ?, ?, 'local', ?, ?, ?)",
            (
                run_id_for(run_dir),
                str(run_dir),
                "sweep" if sweep_id else "cli",
                json.dumps(overrides),
                created,
                sweep_id,
            ),
        )


def mlflow_run_dirs(db: Path) -> list[str]:
    """The run directories the embedded MLflow store beside the runs knows (each run's `run_dir` tag): runs
    started elsewhere (hydra.run.dir=/scratch/...) that logged to it. Read-only SQLite, no MLflow import."""
    if not db.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return [r[0] for r in conn.execute("SELECT value FROM tags WHERE key = 'run_dir'")]
    except sqlite3.Error:  # not an MLflow store, or one being migrated: nothing found this time
        return []


def _hydra_dirs(root: Path, depth: int = 4):
    """`.hydra` folders at most `depth` levels under root (runs/<date>/<time>_<name>/.hydra is three)."""
    level = [root]
    for _ in range(depth):
        following = []
        for folder in level:
            try:
                children = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
            except OSError:
                continue
            for child in children:
                if child.name == ".hydra":
                    yield child
                elif child.name not in ("checkpoints", "mlartifacts", ".serve") and not child.name.startswith(
                    ".relaunch"
                ):
                    following.append(child)
        level = following


def _sweep_dirs(root: Path, depth: int = 4) -> list[Path]:
    """Sweep directories at most `depth` levels under root (runs/multirun/<date>/<time> is three), outside the
    service's own folders, dot-folders, run directories' checkpoints and artifacts, and symlinks."""
    from exp.sweep.manifest import is_sweep_dir

    found, level = [], [root]
    for _ in range(depth):
        following = []
        for folder in level:
            try:
                children = [p for p in folder.iterdir() if not p.name.startswith(".") and _is_folder(p)]
            except OSError:
                continue
            for child in children:
                if is_sweep_dir(child):
                    found.append(child)
                elif not child.name.isdigit() and child.name not in ("checkpoints", "mlartifacts"):
                    if child != root / "serve":  # the jobs' run directories
                        following.append(child)
        level = following
    return found


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    """A sweep's numbered run directories that hold a `.hydra` folder (neither a symlink)."""
    try:
        children = [p for p in sweep_dir.iterdir() if p.name.isdigit() and _is_folder(p)]
    except OSError:
        return []
    return [p.resolve() for p in sorted(children, key=lambda p: int(p.name)) if _is_folder(p / ".hydra")]


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _in_sweep(run_dir: Path) -> bool:
    from exp.sweep.manifest import is_sweep_dir

    return run_dir.name.isdigit() and is_sweep_dir(run_dir.parent)


def _read_overrides(path: Path) -> list[str]:
    import yaml

    try:
        values = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return []
    return [str(v) for v in values] if isinstance(values, list) else []


def _config(row: dict) -> dict:
    return {**row, "overrides": json.loads(row["overrides"])}


def _job(row: dict) -> dict:
    return {
        **row,
        "overrides": json.loads(row["overrides"]),
        "stop_requested": bool(row["stop_requested"]),
        "ahead_closed": bool(row.get("ahead_closed")),
        "slurm_resources": json.loads(row.get("slurm_resources") or "{}"),
    }
