"""model=hf end to end: tiny random Llama and GPT-2 folders (built here, nothing downloads) train through pretrain and
SFT, resume bit-exactly, export back to transformers, serve as a distillation teacher; bad input is one line, exit 2."""

import json
import shutil

import pytest
import torch

import exp.job
from exp.export import main as export_main
from exp.generate import main as generate_main

from ..conftest import JSON_SOURCES, compose_train, run_train
from ..hf_folders import gpt2_folder, llama_folder, token_data
from .test_resume import assert_same, trajectory

transformers = pytest.importorskip("transformers")

NUM_STEPS = 6
HF = [
    "model=hf",
    "model.seq_len=32",
    "hardware=cpu",
    f"stage.num_steps={NUM_STEPS}",
    "stage.batch_size_per_gpu=2",
    "stage.log_every_n_steps=1",
    "stage.eval_every_n_steps=3",
    "stage.num_eval_batches=2",
    "checkpoint.every_n_steps=3",
    "checkpoint.keep_last=0",
    "sample.max_new_tokens=4",
    "tracking=none",
]
SFT = ["stage=sft", "model.seq_len=64", "data.max_examples=16", "stage.eval_at_start=false"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    llama, gpt2 = llama_folder(root / "llama"), gpt2_folder(root / "gpt2")
    return {"llama": llama, "gpt2": gpt2, "data": token_data(JSON_SOURCES, llama, root / "data")}


def train(run_dir, *overrides):
    """train.py's job in this process; a stop by signal is part of the resume scenario."""
    try:
        return exp.job.run_job(compose_train(*HF, *overrides, run_dir=run_dir))
    except SystemExit:
        return None


def runs_of(folders, name):
    model = [f"model.name_or_path={folders[name]}"]
    if name == "llama":  # continued pretraining on tokens of its own tokenizer
        return {"pretrain": [*model, "data=memmap", f"data.path={folders['data']}"], "sft": [*model, *SFT]}
    return {"sft": [*model, *SFT, "model.attn_implementation=eager"]}  # GPT-2: dropout on, tied head, grown vocab


CASES = [("llama", "pretrain"), ("llama", "sft"), ("gpt2", "sft")]


@pytest.fixture(scope="module")
def straight(folders, tmp_path_factory):
    """One uninterrupted run per case."""
    out = {}
    for name, stage in CASES:
        run_dir = tmp_path_factory.mktemp(f"{name}-{stage}")
        train(run_dir, *runs_of(folders, name)[stage])
        out[name, stage] = run_dir
    return out


def _final(run_dir) -> dict:
    from safetensors.torch import load_file

    folder = run_dir / "checkpoints" / f"step_{NUM_STEPS:08d}"
    trainer = json.loads((folder / "trainer_state.json").read_text())
    for key in ("train_seconds", "warmup_seconds", "warmup_tokens"):
        trainer["state"].pop(key)
    return {
        "model": load_file(folder / "model.safetensors"),
        "optimizer": load_file(folder / "optimizer.safetensors"),
        "trainer": trainer,
    }


@pytest.mark.parametrize("name,stage", CASES)
def test_trains_and_resumes_bit_exactly(folders, straight, tmp_path, name, stage):
    run_dir = straight[name, stage]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["step"] == NUM_STEPS
    ckpt = run_dir / "checkpoints" / f"step_{NUM_STEPS:08d}"
    saved = (ckpt / "config.yaml").read_text()
    assert "_target_: exp.model.HFCausalLM" in saved and "model_type:" in saved  # config.json rides along
    assert (ckpt / "tokenizer.json").is_file()
    # stopped by a signal at step 4 (between checkpoints: it saves one), then resumed: the same steps and the same
    # final state, bit for bit
    resumed = tmp_path / "run"
    train(
        resumed,
        *runs_of(folders, name)[stage],
        "+callbacks.stop._target_=tests.hooks.SignalAt",
        "+callbacks.stop.step=4",
    )
    assert json.loads((resumed / "summary.json").read_text())["status"] == "KILLED"
    train(resumed, *runs_of(folders, name)[stage], "resume=auto")
    assert trajectory(resumed) == trajectory(run_dir)
    assert_same(_final(resumed), _final(run_dir))


def test_sft_grows_gpt2_vocabulary_for_the_chat_tokens(folders, straight):
    run_dir = straight["gpt2", "sft"]
    source = json.loads((folders["gpt2"] / "config.json").read_text())["vocab_size"]
    trained = json.loads((run_dir / "summary.json").read_text())
    weights = _final(run_dir)["model"]
    (kept,) = {"hf.transformer.wte.weight", "hf.lm_head.weight"} & weights.keys()  # tied: saved once
    assert weights[kept].shape[0] == source + 4  # <|system|> <|user|> <|assistant|> <|end|>
    assert trained["status"] == "FINISHED"


@pytest.mark.parametrize("name,stage", CASES)
def test_exports_to_transformers_with_the_trained_logits(folders, straight, tmp_path, name, stage):
    from exp.checkpoint import load_model_for_inference

    run_dir = straight[name, stage]
    shutil.move(str(folders[name]), str(folders[name]) + ".moved")  # the run does not need its source folder
    try:
        out = tmp_path / "export"
        assert export_main([str(run_dir), str(out), "--format", "hf"]) == 0
        trained, _ = load_model_for_inference(run_dir)
    finally:
        shutil.move(str(folders[name]) + ".moved", str(folders[name]))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tokenizer("def f(x):\n    return x")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids), rtol=0, atol=1e-5)
    assert json.loads((out / "export.json").read_text())["format"] == "hf"
    assert generate_main([str(run_dir), "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0"]) == 0


def test_hf_models_as_distillation_teachers(folders, straight, tmp_path):
    """A transformers folder and a model=hf run teach exp's GPT (same tokenizer: one vocabulary)."""
    gpt = [
        "model=gpt_tiny",
        "model.n_layer=1",
        "model.d_model=32",
        "model.seq_len=32",
        "data=memmap",
        f"data.path={folders['data']}",
        "stage=distill",
        "stage.num_steps=2",
    ]
    for teacher in (folders["llama"], straight["llama", "pretrain"]):
        run_dir = tmp_path / teacher.name
        train(run_dir, *gpt, f"stage.teacher.path={teacher}")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "FINISHED" and summary["step"] == 2


def test_hf_student_distills_from_an_hf_teacher(folders, tmp_path):
    run_dir = tmp_path / "student"
    llama = runs_of(folders, "llama")["pretrain"]
    train(run_dir, *llama, "stage=distill", "stage.num_steps=2", f"stage.teacher.path={folders['llama']}")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "FINISHED"


def bad(tmp_path, *overrides):
    result = run_train(*HF, f"hydra.run.dir={tmp_path / 'run'}", *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert not (tmp_path / "run").exists()
    return lines[0]


def test_bad_hf_input_is_one_line_and_writes_nothing(folders, tmp_path):
    missing = bad(tmp_path, f"model.name_or_path={tmp_path / 'nowhere'}", *SFT)
    assert "model.name_or_path" in missing and "does not exist" in missing
    bare = llama_folder(tmp_path / "bare", tokenizer=False)
    line = bad(tmp_path, f"model.name_or_path={bare}", *SFT)
    assert "tokenizer.json" in line
    line = bad(tmp_path, f"model.name_or_path={bare}", "data=memmap", f"data.path={folders['data']}")
    assert "model.tokenizer" in line and "tokenizer.json" in line
    line = bad(tmp_path, f"model.name_or_path={folders['llama']}")  # byte tokens of pystdlib: not the model's
    assert line.startswith("config error: data: its tokens come from byte tokens")


def test_bad_init_from_is_one_line_and_writes_nothing(folders, tmp_path):
    gpt = ["model=gpt_tiny", "model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2"]
    gpt += ["model.mlp_hidden=128", "+model.norm_eps=1e-6", "model.tie_embeddings=false"]
    gpt += ["data=memmap", f"data.path={folders['data']}"]
    gpt2 = gpt2_folder(tmp_path / "gpt2")
    shutil.copy(folders["llama"] / "tokenizer.json", gpt2 / "tokenizer.json")  # the data's: only the model differs
    line = bad(tmp_path, *gpt, f"stage.init_from={gpt2}")
    assert "stage.init_from" in line and "model_type 'gpt2' is not llama" in line
    line = bad(tmp_path, *gpt, "model.n_kv_head=4", f"stage.init_from={folders['llama']}")
    assert "num_key_value_heads=2" in line and "model.n_kv_head=4" in line
    ok = tmp_path / "ok"
    train(ok, *gpt, f"stage.init_from={folders['llama']}", "stage.num_steps=1", "checkpoint.every_n_steps=0")
    assert json.loads((ok / "summary.json").read_text())["status"] == "FINISHED"


def test_dpo_trains_an_hf_model_from_its_sft_run(folders, straight, tmp_path):
    import json
    import math

    from exp.rundir import read_metrics

    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no", "rejected": "maybe"} for i in range(40)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "dpo"
    sft_run = straight["llama", "sft"]
    model = [f"model.name_or_path={folders['llama']}", "model.seq_len=64"]
    train(run_dir, *model, "stage=dpo", f"stage.init_from={sft_run}", "data=preference_jsonl", f"data.path={pairs}")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "FINISHED"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    first_val = next(m for m in metrics if "val/loss" in m)
    assert first_val["step"] == 0 and abs(first_val["val/loss"] - math.log(2)) < 1e-5  # policy = reference at start
    assert any("train/rewards/margins" in m for m in metrics)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_lora_on_an_hf_model_trains_its_adapter_only_resumes_and_exports_merged(folders, tmp_path, name):
    from exp.checkpoint import load_model_for_inference
    from exp.model.hf import HFCausalLM

    lora = [*runs_of(folders, name)["sft"], "+model/adapter=lora", "model.adapter.r=4", "stage.learning_rate=1e-2"]
    # the default target finds Llama's q/k/v/o_proj, gate/up/down_proj and GPT-2's c_attn, c_proj, c_fc (Conv1D)
    straight_dir, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(straight_dir, *lora)
    assert json.loads((straight_dir / "summary.json").read_text())["status"] == "FINISHED"
    saved = _final(straight_dir)["model"]
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # the adapter alone is checkpointed
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in saved.items())  # and it trained
    train(stopped, *lora, "+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=4")
    train(stopped, *lora, "resume=auto")
    assert trajectory(stopped) == trajectory(straight_dir)
    assert_same(_final(stopped), _final(straight_dir))

    adapted, _ = load_model_for_inference(straight_dir, merge=False)
    base = HFCausalLM(str(folders[name]), vocab_size=adapted.hf.config.vocab_size, attn_implementation="eager")
    frozen = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if ".lora_" not in k}
    blocks = {k: v for k, v in base.state_dict().items() if ".layers." in k or ".h." in k}  # not the grown vocab
    assert blocks and all(torch.equal(frozen[k], v) for k, v in blocks.items())  # the base's blocks untouched
    out = tmp_path / "export"
    assert export_main([str(straight_dir), str(out), "--format", "hf"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(str(out))("def f(x):\n    return x")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids), rtol=0, atol=1e-5)
        assert (adapted(ids) - base.eval()(ids)).abs().max() > 1e-4  # the adapter moved the logits
