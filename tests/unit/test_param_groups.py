"""optimizer.param_groups (per-group learning rates and weight decay) and model.freeze."""

import json
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

import exp.run
from exp.config import validate
from exp.errors import ConfigError
from exp.model import GPT
from exp.model.protocol import logits_of
from exp.optim import build_optimizer, group_rules
from exp.schedules import cosine

from ..conftest import TINY, compose_train

RULES = [{"match": r"^tok_emb", "lr_mult": 0.1}, {"match": r"norm", "lr_mult": 3.0, "weight_decay": 0.0}]


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)


def test_every_group_gets_its_multiplied_lr_at_every_step_of_the_schedule():
    model = tiny_gpt()
    make = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    optimizer = build_optimizer(make, model, torch.device("cpu"), rules=group_rules(RULES))
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["param_groups[0]:decay", "param_groups[1]:all", "decay"]  # every vector is a norm weight
    mults = {g["name"]: g["lr_mult"] for g in optimizer.param_groups}
    wd = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert wd["param_groups[1]:all"] == 0.0 and wd["param_groups[0]:decay"] == 0.1
    scheduler = cosine(optimizer, num_steps=20, warmup_steps=4, lr_decay_ratio=0.1)
    x = torch.randint(0, 64, (2, 16))
    for step in range(20):
        factor = scheduler.lr_lambdas[0](step)
        for g in optimizer.param_groups:
            assert g["lr"] == pytest.approx(1e-3 * mults[g["name"]] * factor, rel=1e-12), (step, g["name"])
        logits_of(model(x)).float().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    embed = next(g for g in optimizer.param_groups if g["name"] == "param_groups[0]:decay")
    assert embed["params"][0] is model.tok_emb.weight  # the first matching rule wins; tied lm_head is the same tensor


def test_bad_rules_and_patterns_are_one_line_config_errors(tmp_path):
    cases = {
        "optimizer.param_groups=[{match: nothing_matches_this, lr_mult: 2}]": r"^optimizer\.param_groups\[0\]\.match="
        r"'nothing_matches_this' matches no trainable parameter",
        "optimizer.param_groups=[{match: '(', lr_mult: 2}]": r"optimizer\.param_groups\[0\]\.match='\(' is not a "
        r"regular expression",
        "optimizer.param_groups=[{match: norm, lr_mul: 2}]": r"optimizer\.param_groups\[0\]\.lr_mul: unknown key",
        "model.freeze=[zzz]": r"^model\.freeze\[0\]='zzz' matches no parameter of the model",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            validate(compose_train(*TINY, override, run_dir=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_frozen_parameters_do_not_change_and_have_no_optimizer_state_and_groups_survive_resume(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        "model.tie_embeddings=false",
        "model.freeze=['^tok_emb','blocks\\.0\\.']",
        "optimizer.param_groups=[{match: lm_head, lr_mult: 0.5}]",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_best=false",
    ]
    exp.run.train(compose_train(*overrides, run_dir=run_dir))
    ckpt = run_dir / "checkpoints"
    first, last = (
        load_file(ckpt / "step_00000002" / "model.safetensors"),
        load_file(ckpt / "step_00000004" / "model.safetensors"),
    )
    torch.manual_seed(0)  # the run's seed: its model before any step
    cfg = compose_train(*overrides, run_dir=tmp_path / "other")
    init = exp.run.instantiate(exp.config.component(cfg, "model")).state_dict()
    frozen = [k for k in init if k.startswith(("tok_emb", "blocks.0."))]
    assert frozen and all(torch.equal(first[k], init[k]) and torch.equal(last[k], init[k]) for k in frozen)
    assert not torch.equal(first["lm_head.weight"], last["lm_head.weight"])  # the rest trains
    optimizer = json.loads((ckpt / "step_00000004" / "optimizer.json").read_text())
    trainable = sum(1 for k in init if k not in frozen)
    assert len(optimizer["state"]["__int_keys__"]) == trainable  # no state for frozen tensors
    lrs = {g["name"]: g["lr"] for g in optimizer["param_groups"]}
    assert lrs["param_groups[0]:decay"] == pytest.approx(0.5 * lrs["decay"])

    exp.run.train(compose_train(*overrides, "stage.num_steps=6", "resume.allow_config_change=true", run_dir=run_dir))
    resumed = json.loads((ckpt / "step_00000006" / "optimizer.json").read_text())
    lrs = {g["name"]: g["lr"] for g in resumed["param_groups"]}
    assert lrs["param_groups[0]:decay"] == pytest.approx(0.5 * lrs["decay"])
    assert all(torch.equal(load_file(ckpt / "step_00000006" / "model.safetensors")[k], init[k]) for k in frozen)
