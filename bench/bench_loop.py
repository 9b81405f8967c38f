"""What the framework costs over a bare PyTorch loop: throughput, per-step overhead, startup and memory.

The same GPT, batches, AdamW, LR schedule and gradient clipping are trained three ways, each in a fresh
subprocess so that interpreter startup, imports and peak RSS are real:

    bare     bench/bare_loop.py: torch + numpy + exp.model only
    fw off   python train.py ... tracking=none
    fw on    python train.py ... with MLflow into a temporary SQLite store (one store for the whole
             benchmark, its tables created by an untimed warm-up run, as a user's runs/mlflow.db is)

Rounds are interleaved and rotated (bare, off, on; then off, on, bare; ...) so that drift in the
machine's speed falls on every variant alike; each round yields one difference or ratio per figure, and
the tables print the median over rounds with the [min..max] range beside it.

Steady state means after the first log interval, which holds the warm-up steps:
  - tokens/s and step ms: the median over intervals of the framework's perf/tokens_per_s and
    perf/step_ms (metrics.jsonl), and the same per-interval means from the bare loop's step stamps;
  - step ms (wall): the mean over all steady-state steps between the train.log stamps of the log lines,
    which also counts what perf/step_ms leaves out (step-end callbacks, logging); for the bare loop, the
    mean of its stamped step times.
Both sides draw identical batches from identical initial weights, so the training losses must agree; the
table shows the last interval's loss of each as a check that the comparison is like for like.

Time to first step is the Unix time the first optimizer step finished (summary.json's first_step_time,
or the bare loop's own stamp) minus the time just before the subprocess was launched. Peak RSS is the
child's ru_maxrss from os.wait4.

Other processes on the machine are the main source of error, so before each run the benchmark waits
(--max-wait) for the machine to go quiet, measures the CPU other processes used while the run went on
(/proc/stat less the child's own rusage), and repeats a run that competed (--retries), keeping the
quietest attempt. The "other load" row shows what remained.

This is a benchmark: it prints figures and targets side by side and never fails on a miss.

    python bench/bench_loop.py                  # full run, about 6 minutes on 2 quiet CPU cores
    python bench/bench_loop.py --quick          # smoke run, about a minute
    python bench/bench_loop.py --pairs 5 --threads 1 --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # exp imports (for the corpus path) without the project being installed
BARE = ROOT / "bench" / "bare_loop.py"
TRAIN = ROOT / "train.py"
VARIANTS = ("bare", "fw_off", "fw_on")
# Hydra's default job log line, e.g. "[2026-01-02 03:04:05,678][exp][INFO] - step  50/300 | loss ..."
STEP_LINE = re.compile(r"^\[(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[exp\]\[INFO\] - step\s+(?P<step>\d+)/")
LABELS = {"bare": "bare", "fw_off": "fw off", "fw_on": "fw on"}
# What every run reports (run_bare, run_framework); pair_stats derives the comparisons from these.
FIGURES = ("tokens_per_s", "step_ms", "wall_step_ms", "first_step_s", "peak_rss_mb", "last_loss", "other_load_cores")
QUIET_CORES = 0.15  # other processes' CPU use below which the machine counts as quiet
NOISY_CORES = 0.25  # other load during a run above which its figures are flagged as unreliable

# Targets the framework is held to; printed beside the figures, never asserted.
TARGET_STEP_OVERHEAD_MS = 0.1
TARGET_TPS_RATIO = 0.99  # applies to gpt_tiny, where a step is long enough for the ratio to mean throughput
TARGET_FIRST_STEP_S = 0.5  # tracking on, relative to bare
TARGET_RSS_MB = 60.0
TARGET_TRACKING_RATIO = 0.98


@dataclass
class Config:
    """One model/batch setting: its Hydra overrides and step counts for the full and the quick run."""

    name: str
    description: str
    overrides: list[str]
    num_steps: int
    log_every: int
    quick_steps: int
    quick_log_every: int
    tps_target: bool  # whether the tokens/s ratio target applies here
    steps: int = 0
    log: int = 0
    runs: list[dict] = field(default_factory=list)


CONFIGS = [
    Config(
        name="tiny-small",
        description="gpt_tiny with n_layer=1 d_model=32 n_head=2 seq_len=32, batch 4: per-step overhead shows",
        overrides=[
            "model=gpt_tiny",
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
            "model.seq_len=32",
            "stage.batch_size_per_gpu=4",
        ],
        num_steps=300,
        log_every=50,
        quick_steps=100,
        quick_log_every=20,
        tps_target=False,
    ),
    Config(
        name="gpt_tiny",
        description="gpt_tiny defaults: d_model 128, 4 layers, seq_len 128, batch 16",
        overrides=["model=gpt_tiny"],
        num_steps=150,  # 15 s a run: shorter runs left the ratio to the machine's drift (0.98-1.00 over rounds)
        log_every=25,
        quick_steps=20,
        quick_log_every=5,
        tps_target=True,
    ),
]


def parse_args() -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=None, help="interleaved rounds per config (default 5; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer steps and one round: a smoke run of about a minute")
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="OMP_NUM_THREADS for every child (default: the cores this process may run on)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write all runs and medians here")
    p.add_argument(
        "--fresh-store",
        action="store_true",
        help="a new, empty MLflow store for every tracking-on run (first-use cost: table creation) "
        "instead of one store shared by all runs, as a user's runs/mlflow.db is",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="seconds to wait before each run for other processes to go quiet (default 30; 10 with --quick; "
        "0: never wait)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=None,
        help=f"runs repeated when other processes kept more than {NOISY_CORES} cores busy meanwhile; the quietest "
        "attempt counts (default 2; 0 with --quick)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary run directories and print where")
    args = p.parse_args()
    if args.pairs is None:
        args.pairs = 1 if args.quick else 5
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    if args.max_wait is None:
        args.max_wait = 10.0 if args.quick else 30.0
    if args.pairs < 1 or args.threads < 1 or args.retries < 0:
        p.error("--pairs and --threads must be >= 1, --retries >= 0")
    return args


# --- what both sides train -------------------------------------------------------------------------


def resolve(config: Config) -> dict:
    """The framework's composed config for these overrides, reduced to what the bare loop needs."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*config.overrides, "hardware=cpu", f"stage.num_steps={config.steps}"])
    # Only the pieces below are resolved: run_name needs ${hydra:...}, which compose leaves unset.
    model = OmegaConf.to_container(cfg.model, resolve=True)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    scheduler = OmegaConf.to_container(cfg.scheduler, resolve=True)
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    # The bare loop implements exactly the default recipe; anything else would compare different training.
    expected = {
        "model._target_": (model["_target_"], "exp.model.GPT"),
        "optimizer._target_": (optimizer["_target_"], "torch.optim.AdamW"),
        "scheduler._target_": (scheduler["_target_"], "exp.schedules.cosine"),
        "stage.gradient_accumulation_steps": (stage["gradient_accumulation_steps"], 1),
        "stage.dtype": (stage["dtype"], "float32"),
        "stage.label_smoothing": (stage.get("label_smoothing", 0.0), 0.0),
    }
    for key, (got, want) in expected.items():
        if got != want:
            raise SystemExit(f"bench_loop: {key}={got!r}, but the bare loop only implements {want!r}")
    # Built here, outside any timing, so that no child pays for a first build of the corpus.
    data = instantiate(cfg.data)  # exp.data.PyStdlib with the cache_dir the children will use
    train_bin, val_bin = data.files()
    return {
        "model": {k: v for k, v in model.items() if not k.startswith("_")},
        "batch_size": stage["batch_size_per_gpu"],
        "lr": optimizer["lr"],
        "betas": optimizer["betas"],
        "eps": optimizer["eps"],
        "weight_decay": optimizer["weight_decay"],
        "warmup_steps": scheduler["warmup_steps"],
        "warmup_ratio": scheduler["warmup_ratio"],
        "lr_decay_ratio": scheduler["lr_decay_ratio"],
        "max_grad_norm": stage["max_grad_norm"],
        "seed": cfg.seed,
        "train_bin": str(train_bin),
        "val_bin": str(val_bin),
    }


def bare_command(recipe: dict, config: Config, out: Path) -> list[str]:
    """bench/bare_loop.py with the framework's resolved recipe."""
    r = recipe
    return [
        sys.executable,
        str(BARE),
        f"--train-bin={r['train_bin']}",
        f"--val-bin={r['val_bin']}",
        f"--model={json.dumps(r['model'])}",
        f"--batch-size={r['batch_size']}",
        f"--num-steps={config.steps}",
        f"--lr={r['lr']!r}",
        "--betas",
        *(repr(float(b)) for b in r["betas"]),
        f"--eps={r['eps']!r}",
        f"--weight-decay={r['weight_decay']!r}",
        f"--warmup-steps={r['warmup_steps']}",
        f"--warmup-ratio={r['warmup_ratio']!r}",
        f"--lr-decay-ratio={r['lr_decay_ratio']!r}",
        f"--max-grad-norm={r['max_grad_norm']!r}",
        f"--log-every={config.log}",
        f"--seed={r['seed']}",
        f"--out={out}",
    ]


def framework_command(config: Config, run_dir: Path, tracking: list[str]) -> list[str]:
    """train.py as a user runs it, evaluating once at the end and sampling nothing."""
    return [
        sys.executable,
        str(TRAIN),
        *config.overrides,
        "hardware=cpu",
        "sample.max_new_tokens=0",
        "stage.num_eval_batches=1",
        f"stage.eval_every_n_steps={config.steps}",
        f"stage.num_steps={config.steps}",
        f"stage.log_every_n_steps={config.log}",
        # The bare loop writes no checkpoints; the framework still saves once when training ends.
        "checkpoint.every_n_steps=0",
        f"hydra.run.dir={run_dir}",
        *tracking,
    ]


def tracking_overrides(variant: str, store: Path) -> list[str]:
    """tracking=none, or MLflow into `store` with artifacts beside it (never into the repository's runs/)."""
    if variant == "fw_off":
        return ["tracking=none"]
    return [
        "tracking=mlflow",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        f"tracking.artifact_location={store / 'mlartifacts'}",
    ]


# --- running one child -----------------------------------------------------------------------------


def cpu_busy_seconds() -> float | None:
    """CPU seconds spent busy so far by the whole machine (all cores), from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # the first 8 exclude guest time, counted in user


def other_load(seconds: float = 0.5) -> float | None:
    """Cores kept busy by other processes over the next `seconds` (this process sleeps meanwhile)."""
    before = cpu_busy_seconds()
    time.sleep(seconds)
    after = cpu_busy_seconds()
    return None if before is None or after is None else (after - before) / seconds


def wait_for_quiet(max_wait: float) -> None:
    """Hold off launching while other processes keep more than QUIET_CORES busy, for up to max_wait seconds."""
    deadline = time.monotonic() + max_wait
    load = other_load()
    if load is None or load <= QUIET_CORES:
        return
    progress(f"    waiting for other load ({load:.2f} cores busy) to settle, up to {max_wait:.0f} s")
    while time.monotonic() < deadline:
        load = other_load(1.0)
        if load <= QUIET_CORES:
            return
    progress(f"    still {load:.2f} cores busy elsewhere; running anyway (see 'other load' in the table)")


def launch(cmd: list[str], env: dict, log_path: Path) -> dict:
    """Run cmd to completion: its launch Unix time, peak RSS, and the other load beside it. Exits on failure."""
    with open(log_path, "w") as log:
        busy = cpu_busy_seconds()
        started = time.monotonic()
        launched = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        # wait4 rather than Popen.wait: it also returns the child's rusage, whose ru_maxrss is its peak RSS.
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - started
        busy_after = cpu_busy_seconds()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"bench_loop: exit status {proc.returncode} from\n  {' '.join(cmd)}\n{tail}")
    other = None
    if busy is not None and busy_after is not None:
        # Machine-wide busy time minus the child's own: what other processes took while it ran, in cores.
        other = max(0.0, (busy_after - busy - usage.ru_utime - usage.ru_stime) / elapsed)
    # ru_maxrss is in KiB on Linux.
    return {"launched": launched, "peak_rss_mb": usage.ru_maxrss / 1024, "other_load_cores": other}


def interval_means(values: list[float], size: int) -> list[float]:
    """Means over consecutive chunks of `size`, the last one possibly shorter (as the framework logs)."""
    return [statistics.fmean(values[i : i + size]) for i in range(0, len(values), size)]


def log_stamps(path: Path) -> dict[int, float]:
    """Unix time of each `step N/M` line in a run's train.log (Hydra's default format, millisecond stamps)."""
    stamps = {}
    for line in path.read_text().splitlines():
        m = STEP_LINE.match(line)
        if m:
            stamps[int(m["step"])] = datetime.strptime(m["stamp"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return stamps


def run_bare(recipe: dict, config: Config, work: Path, env: dict, tag: str) -> dict:
    """One bare-loop child; the figures of the framework's summary and metrics, computed the same way."""
    out = work / f"{tag}.json"
    child = launch(bare_command(recipe, config, out), env, work / f"{tag}.log")
    r = json.loads(out.read_text())
    step_s = interval_means(r["step_seconds"], config.log)[1:]  # the first interval holds the warm-up
    tokens = r["tokens_per_step"]
    after_warmup = r["step_seconds"][config.log :]
    return {
        "step_ms": 1000 * statistics.median(step_s),
        "wall_step_ms": 1000 * statistics.fmean(after_warmup),
        "tokens_per_s": statistics.median(tokens / s for s in step_s),
        "overall_tokens_per_s": tokens * len(r["step_seconds"]) / sum(r["step_seconds"]),
        "first_step_s": r["first_step_time"] - child["launched"],
        "peak_rss_mb": child["peak_rss_mb"],
        "other_load_cores": child["other_load_cores"],
        "last_loss": r["interval_losses"][-1],
        "interval_step_ms": [1000 * s for s in step_s],
    }


def run_framework(config: Config, work: Path, env: dict, tag: str, tracking: list[str]) -> dict:
    """One train.py child; steady-state figures from metrics.jsonl, startup from summary.json."""
    run_dir = work / tag
    child = launch(framework_command(config, run_dir, tracking), env, work / f"{tag}.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    perf = [m for m in lines if "perf/step_ms" in m][1:]  # the first interval holds the warm-up
    if summary["step"] != config.steps or not perf or summary["first_step_time"] is None:
        raise SystemExit(f"bench_loop: {run_dir} did not finish {config.steps} steps with perf metrics")
    # perf/step_ms leaves out step-end callbacks and logging; the log lines' stamps include everything.
    stamps = log_stamps(run_dir / "train.log")
    first, last = config.log, config.steps
    wall = 1000 * (stamps[last] - stamps[first]) / (last - first) if first in stamps and last in stamps else None
    return {
        "step_ms": statistics.median(m["perf/step_ms"] for m in perf),
        "wall_step_ms": wall,
        "tokens_per_s": statistics.median(m["perf/tokens_per_s"] for m in perf),
        "overall_tokens_per_s": summary["tokens_per_s"],
        "first_step_s": summary["first_step_time"] - child["launched"],
        "peak_rss_mb": child["peak_rss_mb"],
        "other_load_cores": child["other_load_cores"],
        "last_loss": perf[-1]["train/loss"],
        "interval_step_ms": [m["perf/step_ms"] for m in perf],
    }


# --- the benchmark ---------------------------------------------------------------------------------


def progress(message: str) -> None:
    """A line on stderr, so that stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)


def run_config(config: Config, recipe: dict, args, work: Path, env: dict) -> None:
    """All rounds of one configuration, interleaved and rotated, into config.runs."""
    for rnd in range(args.pairs):
        # Rotating the order keeps any position effect (a just-warmed cache, a neighbour's burst) off one variant.
        order = VARIANTS[rnd % 3 :] + VARIANTS[: rnd % 3]
        row = {}
        for variant in order:
            row[variant] = run_quietest(config, recipe, variant, rnd, args, work, env)
        config.runs.append(row)


def run_quietest(config: Config, recipe: dict, variant: str, rnd: int, args, work: Path, env: dict) -> dict:
    """One variant's run; repeated (up to --retries times) while another process competed, keeping the quietest."""
    best = None
    for attempt in range(1 + args.retries):
        tag = f"{config.name}-{variant}-{rnd}-{attempt}"
        if args.max_wait > 0:
            wait_for_quiet(args.max_wait)
        if variant == "bare":
            r = run_bare(recipe, config, work, env, tag)
        else:
            store = work / (f"store-{tag}" if args.fresh_store else "store")
            r = run_framework(config, work, env, tag, tracking_overrides(variant, store))
        load = r["other_load_cores"]
        progress(
            f"  {config.name} round {rnd + 1}/{args.pairs} {LABELS[variant]:>6}: "
            f"{r['tokens_per_s']:>9,.0f} tok/s {r['step_ms']:8.3f} ms/step "
            f"first step {r['first_step_s']:5.2f} s  peak RSS {r['peak_rss_mb']:6.1f} MB"
            + (f"  other load {load:.2f} cores" if load is not None else "")
        )
        if best is None or (load is not None and load < best["other_load_cores"]):
            best = r
        if load is None or load <= NOISY_CORES:
            break
        if attempt < args.retries:
            progress(f"    another process competed ({load:.2f} cores); running it again")
    return best


def warm_up(args, work: Path, env: dict) -> None:
    """One untimed tracking-on run: fills the page cache with the imports and creates the shared store's tables."""
    short = dataclasses.replace(CONFIGS[0], steps=10, log=5, runs=[])
    progress("warm-up run (not counted)")
    store = work / "store"
    launch(framework_command(short, work / "warmup", tracking_overrides("fw_on", store)), env, work / "warmup.log")


def pair_stats(config: Config) -> dict:
    """Per-round figures, differences and ratios; their medians and ranges over rounds."""
    per_round = []
    for row in config.runs:
        b, off, on = row["bare"], row["fw_off"], row["fw_on"]
        fig = {f"{v}_{k}": row[v][k] for v in VARIANTS for k in FIGURES}
        for v in ("fw_off", "fw_on"):
            fig[f"{v}_tps_ratio"] = row[v]["tokens_per_s"] / b["tokens_per_s"]
            fig[f"{v}_step_overhead_ms"] = row[v]["step_ms"] - b["step_ms"]
            fig[f"{v}_wall_overhead_ms"] = _sub(row[v]["wall_step_ms"], b["wall_step_ms"])
            fig[f"{v}_first_step_delta_s"] = row[v]["first_step_s"] - b["first_step_s"]
            fig[f"{v}_rss_delta_mb"] = row[v]["peak_rss_mb"] - b["peak_rss_mb"]
        fig["tracking_on_off_ratio"] = on["tokens_per_s"] / off["tokens_per_s"]
        per_round.append(fig)
    out = {"per_round": per_round, "median": {}, "min": {}, "max": {}}
    for key in per_round[0]:
        values = [r[key] for r in per_round if r[key] is not None]
        for name, fn in (("median", statistics.median), ("min", min), ("max", max)):
            out[name][key] = fn(values) if values else None
    return out


def _sub(a: float | None, b: float | None) -> float | None:
    """a - b, or None when either is missing."""
    return None if a is None or b is None else a - b


def format_table(config: Config, stats: dict, args) -> str:
    """The per-configuration table: medians over rounds, [min..max] beside them when there are several."""
    med, lo, hi = stats["median"], stats["min"], stats["max"]
    ranged = args.pairs > 1
    fw = ("fw_off", "fw_on")

    def cell(key: str, fmt: str, target=None) -> str:
        """Median, range, and a pass/miss mark when a target applies."""
        if med[key] is None:
            return "n/a"
        text = format(med[key], fmt)
        if ranged:
            text += f" [{format(lo[key], fmt)}..{format(hi[key], fmt)}]"
        if target is not None:
            text += " ok" if target(med[key]) else " MISS"
        return text

    def row(label: str, key: str, fmt: str, variants=VARIANTS, target=None, note: str = "", marked=None):
        """One table row: label, a cell per variant (blank where it does not apply), the target's text."""
        marked = variants if marked is None else marked
        cells = [cell(key.format(v=v), fmt, target if v in marked else None) if v in variants else "" for v in VARIANTS]
        return [label, *cells, note]

    def at_most(limit):
        """Target: no more than limit."""
        return lambda x: x <= limit

    def at_least(limit):
        """Target: at least limit."""
        return lambda x: x >= limit

    tps_target = at_least(TARGET_TPS_RATIO) if config.tps_target else None
    rows = [
        ["", *(LABELS[v] for v in VARIANTS), "target"],
        row("tokens/s", "{v}_tokens_per_s", ",.0f"),
        row(
            "  fw / bare",
            "{v}_tps_ratio",
            ".3f",
            fw,
            tps_target,
            f">= {TARGET_TPS_RATIO}" + ("" if config.tps_target else " (applies to gpt_tiny)"),
        ),
        row("step ms (perf/step_ms)", "{v}_step_ms", ".3f"),
        row(
            "  fw - bare",
            "{v}_step_overhead_ms",
            "+.3f",
            fw,
            at_most(TARGET_STEP_OVERHEAD_MS),
            f"<= {TARGET_STEP_OVERHEAD_MS}",
        ),
        row("step ms (wall, log stamps)", "{v}_wall_step_ms", ".3f"),
        row(
            "  fw - bare",
            "{v}_wall_overhead_ms",
            "+.3f",
            fw,
            at_most(TARGET_STEP_OVERHEAD_MS),
            f"<= {TARGET_STEP_OVERHEAD_MS}",
        ),
        row("first step s", "{v}_first_step_s", ".2f"),
        row(
            "  fw - bare",
            "{v}_first_step_delta_s",
            "+.2f",
            fw,
            at_most(TARGET_FIRST_STEP_S),
            f"<= {TARGET_FIRST_STEP_S} (fw on)",
            marked=("fw_on",),
        ),
        row("peak RSS MB", "{v}_peak_rss_mb", ".1f"),
        row("  fw - bare", "{v}_rss_delta_mb", "+.1f", fw, at_most(TARGET_RSS_MB), f"<= {TARGET_RSS_MB:.0f}"),
        row(
            "tracking on / off tok/s",
            "tracking_on_off_ratio",
            ".3f",
            ("fw_on",),
            at_least(TARGET_TRACKING_RATIO),
            f">= {TARGET_TRACKING_RATIO}",
        ),
        row("last interval loss", "{v}_last_loss", ".4f", note="equal: same batches, same init"),
        row("other load, cores", "{v}_other_load_cores", ".2f", note=f"> {NOISY_CORES}: another process competed"),
    ]

    widths = [max(len(r[i]) for r in rows) for i in range(len(VARIANTS) + 1)]
    lines = [
        f"== {config.name}: {config.description}",
        f"   {config.steps} steps, log every {config.log}, OMP_NUM_THREADS={args.threads}, {args.pairs} "
        f"round{'s' if ranged else ''}; median{' [min..max] over rounds' if ranged else ''}; "
        "steady state = after the first log interval",
    ]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:], strict=True)]
        lines.append("  ".join(cells) + (f"   {r[-1]}" if r[-1] else ""))
    return "\n".join(lines)


def main() -> None:
    """Run every configuration, print the tables, and optionally write the JSON record."""
    args = parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the overrides name the store; nothing else may redirect it
    work = Path(tempfile.mkdtemp(prefix="bench_loop-"))
    started = time.perf_counter()
    tables, record = [], {"settings": {}, "configs": {}}
    try:
        for config in CONFIGS:
            config.steps = config.quick_steps if args.quick else config.num_steps
            config.log = config.quick_log_every if args.quick else config.log_every
        recipes = [resolve(config) for config in CONFIGS]
        warm_up(args, work, env)
        for config, recipe in zip(CONFIGS, recipes, strict=True):
            progress(f"{config.name}: {args.pairs} round(s) of bare, fw off, fw on")
            run_config(config, recipe, args, work, env)
            stats = pair_stats(config)
            tables.append(format_table(config, stats, args))
            record["configs"][config.name] = {
                "description": config.description,
                "overrides": config.overrides,
                "num_steps": config.steps,
                "log_every_n_steps": config.log,
                "runs": config.runs,
                **stats,
            }
    finally:
        num_runs = len(list(work.glob("*.log")))  # one log per launched child
        if args.keep:
            progress(f"run directories kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started
    record["settings"] = {
        "pairs": args.pairs,
        "quick": args.quick,
        "threads": args.threads,
        "fresh_store": args.fresh_store,
        "python": sys.version.split()[0],
        "elapsed_s": elapsed,
        "num_runs": num_runs,
        "targets": {
            "step_overhead_ms": TARGET_STEP_OVERHEAD_MS,
            "tokens_per_s_ratio_gpt_tiny": TARGET_TPS_RATIO,
            "first_step_delta_s_tracking_on": TARGET_FIRST_STEP_S,
            "peak_rss_delta_mb": TARGET_RSS_MB,
            "tracking_on_off_ratio": TARGET_TRACKING_RATIO,
        },
    }
    print("\n\n".join(tables))
    print(f"\n{record['settings']['num_runs']} runs (warm-up and repeats included) in {elapsed:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
