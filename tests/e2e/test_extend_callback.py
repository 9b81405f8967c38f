"""docs/extending.md's "Callback" example, run as a user would: a callback that stops at a target val loss,
remembers what it saw across a resume, and hears of every checkpoint."""

import json

from exp.loop import Callback

from ..conftest import TINY, run_train


class StopAtLoss(Callback):
    """Stops the run once val loss reaches `target`; lists the checkpoints it was told of in `record`."""

    def __init__(self, target: float, record: str):
        self.target, self.record, self.evals = target, record, []

    def on_eval_end(self, state, metrics):
        self.evals.append(metrics["val/loss"])
        if metrics["val/loss"] <= self.target:
            self.should_stop = True
            self.stop_reason = f"val loss {metrics['val/loss']:.3f} reached {self.target} at step {state.step}"

    def on_checkpoint(self, state, path):
        with open(self.record, "a") as f:
            f.write(f"{state.step} {path} {len(self.evals)}\n")

    def state_dict(self):  # kept in each checkpoint, handed back on resume
        return {"evals": self.evals}

    def load_state_dict(self, state):
        self.evals = state["evals"]


def test_a_users_callback_stops_the_run_keeps_its_state_and_hears_of_checkpoints(tmp_path):
    run_dir, record = tmp_path / "run", tmp_path / "checkpoints.txt"
    mine = [
        "+callbacks.mine._target_=tests.e2e.test_extend_callback.StopAtLoss",
        f"+callbacks.mine.record={record}",
        "stage.num_steps=12",
        "stage.eval_every_n_steps=2",
        "checkpoint.every_n_steps=2",
        f"hydra.run.dir={run_dir}",
    ]
    first = run_train(*TINY, *mine, "+callbacks.mine.target=0", "stage.num_steps=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_train(*TINY, *mine, "+callbacks.mine.target=100", "resume.allow_config_change=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6 and summary["stop_reason"].endswith("reached 100 at step 6")
    saved = [line.split() for line in record.read_text().splitlines()]
    # steps 2 and 4 in the first process; 6 after resuming, each told once it is on disk, holding the callback's
    # state of its step: 1, 2 and 3 evaluations (2 of them restored)
    assert [int(s) for s, _, _ in saved] == [2, 4, 6]
    assert saved[-1][1].endswith("step_00000006")
    kept = [json.loads((run_dir / "checkpoints" / f"step_{s:08d}" / "trainer_state.json").read_text()) for s in (4, 6)]
    assert [len(k["callbacks"]["callbacks.mine"]["evals"]) for k in kept] == [2, 3]
