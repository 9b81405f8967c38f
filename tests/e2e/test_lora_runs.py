"""LoRA runs end to end: a pretrained tiny base, a LoRA SFT run on it (only the adapter trains, the base stays
bit-identical), exports (merged exp and hf, the peft adapter on the hf export of the base) with exp's logits,
bit-exact resume and refusal on another base, distillation, a user's module, and peft missing."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import exp.job
from exp.checkpoint import load_model_for_inference
from exp.loop import Callback

from ..conftest import ROOT, TINY, compose_train, run_train
from .test_resume import assert_same, trajectory

NUM_STEPS = 8
SIZES = [o for o in TINY if not o.startswith("model.seq_len")] + ["model.seq_len=128", "model.n_kv_head=2"]
BASE = [*SIZES, "stage.num_steps=4", "checkpoint.every_n_steps=0"]
LORA = [
    *SIZES,
    "stage=sft",
    f"stage.num_steps={NUM_STEPS}",
    "stage.learning_rate=1e-2",  # a few steps move B away from zero enough to see in the logits
    "stage.log_every_n_steps=1",
    "stage.eval_every_n_steps=4",
    "checkpoint.every_n_steps=4",
    "checkpoint.keep_last=0",
    "+model/adapter=lora",
    "model.adapter.r=4",
    "model.adapter.dropout=0.1",  # the adapters' dropout draws from the RNG a resume must restore
    "+callbacks.rng._target_=tests.hooks.GlobalRngUser",
]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


class KeepWeights(Callback):
    """Writes the trained model's whole state and the names of the optimizer's parameters at the end of the run."""

    def __init__(self, path: str):
        self.path = path

    def on_build(self, model, optimizer, scheduler):
        self.model, self.optimizer = model, optimizer

    def on_train_end(self, state, status):
        names = {id(p): n for n, p in self.model.named_parameters()}
        in_optimizer = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        save_file({k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}, self.path)
        with open(self.path + ".json", "w") as f:
            json.dump(in_optimizer, f)


def job(run_dir, *overrides):
    """train.py's job in this process; a stop by signal is part of the scenario."""
    try:
        return exp.job.run_job(compose_train(*overrides, run_dir=run_dir))
    except (SystemExit, KeyboardInterrupt):
        return None


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base") / "run"
    job(run_dir, *BASE)
    return run_dir


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    keep = run_dir.parent / "trained.safetensors"
    job(run_dir, *LORA, f"stage.init_from={base}", f"+callbacks.keep._target_={__name__}.KeepWeights",
        f"+callbacks.keep.path={keep}")  # fmt: skip
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "FINISHED"
    return run_dir


def final_state(run_dir) -> dict:
    folder = run_dir / "checkpoints" / f"step_{NUM_STEPS:08d}"
    trainer = json.loads((folder / "trainer_state.json").read_text())
    for key in ("train_seconds", "warmup_seconds", "warmup_tokens"):
        trainer["state"].pop(key)
    state = {"model": load_file(folder / "model.safetensors"), "optimizer": load_file(folder / "optimizer.safetensors")}
    state |= {"trainer": trainer, "scheduler.json": json.loads((folder / "scheduler.json").read_text())}
    return state


def test_only_the_adapter_trains_and_the_base_stays_bit_identical(base, lora):
    start = load_file(base / "checkpoints" / "step_00000004" / "model.safetensors")
    trained = load_file(lora.parent / "trained.safetensors")
    in_optimizer = json.loads((lora.parent / "trained.safetensors.json").read_text())
    adapter = {k for k in trained if ".lora_" in k}
    assert adapter and set(in_optimizer) == adapter  # the optimizer sees the adapter's parameters only
    for name, weight in start.items():  # every base tensor, under its name inside peft's layer where it has one
        ours = trained.get(name, trained.get(name.replace(".weight", ".base_layer.weight")))
        assert torch.equal(ours, weight), f"base tensor {name} changed"
    assert all(trained[k].abs().max() > 0 for k in adapter if ".lora_B." in k)  # B left zero: it did not train
    saved = load_file(lora / "checkpoints" / f"step_{NUM_STEPS:08d}" / "model.safetensors")
    assert set(saved) == {k.replace(".default.", ".") for k in adapter}  # the checkpoint holds the adapter only
    for k in adapter:
        assert torch.equal(saved[k.replace(".default.", ".")], trained[k])


def test_exports_have_the_adapted_models_logits(base, lora, tmp_path):
    out = {name: tmp_path / name for name in ("merged", "merged_hf", "base_hf", "adapter")}
    for args in (
        [lora, out["merged"], "--merge"],
        [lora, out["merged_hf"], "--format", "hf"],
        [base, out["base_hf"], "--format", "hf"],
        [lora, out["adapter"], "--format", "peft"],
    ):
        r = cli("-m", "exp.export", *map(str, args))
        assert r.returncode == 0, r.stderr
    assert "(LoRA merged into its base)" in cli("-m", "exp.export", str(lora), str(tmp_path / "again")).stdout
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out["adapter"].iterdir()}

    from peft import PeftModel

    x = torch.randint(264, (3, 40), generator=torch.Generator().manual_seed(0))
    adapted, _ = load_model_for_inference(lora, merge=False)
    plain, _ = load_model_for_inference(base)
    merged, merged_cfg = load_model_for_inference(out["merged"])
    hf_base = AutoModelForCausalLM.from_pretrained(out["base_hf"], local_files_only=True)
    on_hf = PeftModel.from_pretrained(hf_base, out["adapter"]).eval()
    merged_hf = AutoModelForCausalLM.from_pretrained(out["merged_hf"], local_files_only=True).eval()
    with torch.no_grad():
        ours = adapted(x)[0]
        assert (ours - plain(x)[0]).abs().max() > 1e-3  # the adapter changes the logits: the checks below have teeth
        assert (merged(x)[0] - ours).abs().max() < 1e-5
        assert (on_hf(x).logits - ours).abs().max() < 1e-5
        assert (merged_hf(x).logits - ours).abs().max() < 1e-5
    assert "adapter" not in merged_cfg and type(merged.blocks[0].attn.qkv) is torch.nn.Linear
    r = cli("-m", "exp.generate", str(out["merged"]), "--prompt", "def ", "--max-new-tokens", "4")
    assert r.returncode == 0 and r.stdout.startswith("def "), r.stderr


def test_export_refuses_what_does_not_fit(base, lora, tmp_path):
    for args, said in (
        ([base, tmp_path / "a", "--format", "peft"], "has no adapter to export as peft"),
        ([lora, tmp_path / "b", "--format", "peft", "--merge"], "--merge writes full weights and --format peft"),
    ):
        r = cli("-m", "exp.export", *map(str, args))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and said in r.stderr, r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_resumed_lora_run_is_bit_identical(base, lora, tmp_path):
    run_dir = tmp_path / "run"
    keep = [f"stage.init_from={base}", "+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=6"]
    job(run_dir, *LORA, *keep)  # stopped between the checkpoints of steps 4 and 8: the signal saves step 6
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "KILLED"
    job(run_dir, *LORA, f"stage.init_from={base}", "resume=auto")
    assert trajectory(run_dir) == trajectory(lora)
    assert_same(final_state(run_dir), final_state(lora))
    other = final_state(lora)
    name = next(iter(other["model"]))
    other["model"][name] = other["model"][name] + 1e-7  # the comparison has teeth
    with pytest.raises(AssertionError):
        assert_same(final_state(run_dir), other)


def test_a_resume_on_another_base_is_refused(base, lora, tmp_path):
    moved_on = tmp_path / "base"  # the base run, trained further: its newest checkpoint is another base
    shutil.copytree(base, moved_on)
    job(moved_on, *BASE, "stage.num_steps=6", "resume.allow_config_change=true")
    assert (moved_on / "checkpoints" / "step_00000006").is_dir()
    run_dir = tmp_path / "run"
    shutil.copytree(lora, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    summary = (run_dir / "summary.json").read_text()
    r = run_train(
        *LORA,
        f"stage.num_steps={NUM_STEPS + 4}",
        f"stage.init_from={moved_on}",
        "resume.allow_config_change=true",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert "cannot resume from" in r.stderr and "its adapter was trained on other base weights" in r.stderr
    assert str(base / "checkpoints" / "step_00000004") in r.stderr  # where its base was
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert (run_dir / "summary.json").read_text() == summary


def test_lora_distillation_trains_the_adapter_only(base, tmp_path):
    run_dir = tmp_path / "run"
    stage = ["stage=distill", f"stage.teacher.path={base}", f"stage.init_from={base}", "checkpoint.every_n_steps=0"]
    job(run_dir, *SIZES, *stage, "+model/adapter=lora", "model.adapter.target=attn")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "FINISHED"
    saved = load_file(run_dir / "checkpoints" / "step_00000004" / "model.safetensors")
    assert sorted({k.rpartition(".lora_")[0] for k in saved}) == [
        f"blocks.{i}.attn.{m}" for i in (0, 1) for m in ("proj", "qkv")
    ]


def test_lora_on_a_user_module(tmp_path):
    user = ["model=custom", "model._target_=tests.unit.test_extend_model.TinyLM", "model.seq_len=32"]
    overrides = [*(o for o in TINY if not o.startswith("model")), *user]
    base = tmp_path / "base"
    job(base, *overrides)
    run_dir = tmp_path / "run"
    job(run_dir, *overrides, f"stage.init_from={base}", "+model/adapter=lora", "model.adapter.target=head",
        "stage.learning_rate=1e-2")  # fmt: skip
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "FINISHED"
    assert set(load_file(run_dir / "checkpoints" / "step_00000004" / "model.safetensors")) == {
        "head.lora_A.weight",
        "head.lora_B.weight",
    }
    allow = ("tests.",)
    adapted, _ = load_model_for_inference(run_dir, merge=False, allow=allow)
    plain, _ = load_model_for_inference(base, allow=allow)
    merged, _ = load_model_for_inference(run_dir, allow=allow)
    assert torch.equal(adapted.head.base_layer.weight, plain.head.weight)
    x = torch.randint(264, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (adapted(x) - plain(x)).abs().max() > 1e-4
        assert (merged(x) - adapted(x)).abs().max() < 1e-5


def test_bad_lora_input_from_the_command_line_writes_nothing(base, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['peft'] = None  # import peft: ImportError\n")
    train = [sys.executable, str(ROOT / "train.py"), *BASE, "+model/adapter=lora", f"stage.init_from={base}"]
    cases = [
        ({"PYTHONPATH": f"{hide}:{ROOT}"}, [], "config error: model.adapter: LoRA needs the peft package"),
        ({}, ["model.adapter.target=nothing"], "config error: model.adapter.target='nothing' matches no linear layer"),
        ({}, ["model.adapter.r=-1"], "config error: model.adapter.r=-1 must be an integer >= 1"),
    ]
    for i, (env, extra, said) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        r = subprocess.run(
            [*train, *extra, f"hydra.run.dir={run_dir}"],
            capture_output=True,
            text=True,
            env={**ENV, **env},
            cwd=tmp_path,
        )
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(said), r.stderr[-3000:]
        assert not run_dir.exists()
