"""Every option of every group composes, validates and instantiates; bad values fail naming their key."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from exp.config import ConfigError, component, validate
from exp.optim import build_optimizer

from ..conftest import CONF_DIR, compose_train, make_export

OPTIONS = [(g.name, f.stem) for g in sorted(CONF_DIR.iterdir()) if g.is_dir() for f in sorted(g.glob("*.yaml"))]
NEEDS = {
    ("data", "memmap"): ["data.path=."],
    ("hardware", "gpu"): None,
    ("hardware", "slurm_gpu"): None,
    ("model", "custom"): ["model._target_=tests.unit.test_extend_model.TinyLM"],
    ("data", "torch_dataset"): ["+data.dataset._target_=tests.unit.test_extend_data.MyDataset", "data.vocab_size=48"],
}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_validates_and_instantiates(group, option, tmp_path):
    make_cfg = lambda *ov: compose_train("hardware=cpu", "tracking=none", *ov, run_dir=tmp_path / "run")
    extra = NEEDS.get((group, option), [])
    if extra is None:
        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="hardware.device=cuda"):
                validate(make_cfg(f"{group}={option}"))
            return
        extra = []
    if (group, option) in (("stage", "midtrain"), ("stage", "distill")):
        extra = [f"stage.teacher.path={make_export(tmp_path / 'teacher')}"]
    if (group, option) == ("stage", "dpo") or option.startswith("preference"):  # DPO starts from trained weights
        extra = [f"stage.init_from={make_export(tmp_path / 'sft')}", *(["stage=dpo"] if group == "data" else [])]
    if (group, option) == ("data", "preference_jsonl"):
        (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "yes", "rejected": "no"}\n' * 2)
        extra.append(f"data.path={tmp_path / 'pairs.jsonl'}")
    if (group, option) == ("model", "hf"):  # a tiny transformers folder; SFT data takes its tokenizer
        from ..hf_folders import llama_folder

        extra = [f"model.name_or_path={llama_folder(tmp_path / 'llama')}", "stage=sft", "data.max_examples=8"]
    if (group, option) == ("data", "sft_jsonl"):
        (tmp_path / "chat.jsonl").write_text('{"prompt": "p", "response": "r"}\n' * 2)
        extra = [f"data.path={tmp_path / 'chat.jsonl'}"]
    if group == "pipeline":  # a pipeline is checked stage by stage, each a full config of its own
        from exp.pipeline import compose_stages

        stages = compose_stages(make_cfg(f"{group}={option}"))
        assert len(stages) >= 2 and all("pipeline" not in c for c in stages.values())
        return
    if (group, option) == ("data", "memmap"):
        (tmp_path / "train.bin").write_bytes(bytes(4096))
        (tmp_path / "val.bin").write_bytes(bytes(4096))
        extra = [f"data.path={tmp_path}"]
    cfg = make_cfg(f"{group}={option}", *extra)
    validate(cfg)
    node = component(cfg, group)  # without exp's own keys (model.freeze, optimizer.param_groups)
    with torch.device("meta"):
        built = instantiate(node)  # partials too: this still imports the target
    assert built is not None


def test_defaults_compose_to_the_documented_choices():
    cfg = compose_train(run_dir="/tmp/x")
    assert cfg.model._target_ == "exp.model.GPT"
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.scheduler._target_ == "exp.schedules.cosine"
    assert cfg.data._target_ == "exp.data.PyStdlib"
    assert cfg.stage.name == "pretrain"


def test_stage_fields_drive_optimizer_and_scheduler(make_cfg):
    cfg = make_cfg("stage.learning_rate=0.0123", "stage.num_steps=77", "stage.weight_decay=0.05")
    assert cfg.optimizer.lr == pytest.approx(0.0123)
    assert cfg.optimizer.weight_decay == pytest.approx(0.05)
    assert cfg.scheduler.num_steps == 77
    cfg = make_cfg("optimizer.lr=0.5")
    assert cfg.optimizer.lr == 0.5 and cfg.stage.learning_rate != 0.5


def test_optimizer_betas_reach_torch_as_plain_list(make_cfg):
    cfg = make_cfg()
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(instantiate(component(cfg, "optimizer")), model, device=torch.device("cpu"))
    assert type(opt.defaults["betas"]) in (list, tuple)


@pytest.mark.parametrize(
    "override,key",
    [
        ("+optimizer.lrr=0.1", "optimizer.lrr"),
        ("+stage.foo=1", "stage.foo"),
        ("+foo=1", "'foo'"),
        ("stage.learning_rate=-1", "stage.learning_rate"),
        ("optimizer.lr=-1", "optimizer"),
        ("optimizer.lr=abc", "optimizer.lr"),
        ("stage.num_steps=abc", "stage.num_steps"),
        ("stage.warmup_steps=4", "stage.warmup_steps"),
        ("stage.max_grad_norm=0", "stage.max_grad_norm"),
        ("stage.gradient_accumulation_steps=0", "stage.gradient_accumulation_steps"),
        ("stage.dtype=float8", "stage.dtype"),
        ("hardware.device=cuda", "hardware.device"),
        ("hardware.device=tpu", "hardware.device"),
        ("model.n_head=3", "model"),
        ("data=memmap", "data.path"),
        ("data=memmap data.path=/nonexistent/tokens", "data.path"),
        ("stage.num_steps=${stage.nope}", "stage.nope"),
        ("scheduler=exponential stage.lr_decay_ratio=0", "lr_decay_ratio"),
        ("scheduler=wsd scheduler.decay_shape=zigzag", "decay_shape"),
        ("model.d_model=abc", "model.d_model='abc' must be an integer"),
        ("model.n_layer=2.5", "model.n_layer=2.5 must be an integer"),
        ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] must be a list of 2 values"),
        ("optimizer.betas=[0.9,x]", "optimizer.betas=[0.9,'x'] must be a list of 2 numbers"),
        ("checkpoint.dir=/proc/exp-checkpoints", "checkpoint.dir=/proc/exp-checkpoints is not writable"),
    ],
)
def test_bad_value_fails_naming_the_key(make_cfg, override, key):
    cfg = make_cfg(*override.split())
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert key in message, message
    assert "\n" not in message


def test_optimizer_lr_alone_sets_the_stage_learning_rate_so_they_cannot_disagree(make_cfg):
    cfg = make_cfg("optimizer.lr=1e-3", "optimizer.weight_decay=0.05")
    validate(cfg)
    assert cfg.stage.learning_rate == 1e-3 and cfg.optimizer.lr == 1e-3  # one value, recorded as stage.*
    assert OmegaConf.is_interpolation(cfg.optimizer, "lr") and cfg.stage.weight_decay == 0.05


def test_optimizer_lr_and_stage_learning_rate_set_apart_are_refused(make_cfg):
    cfg = make_cfg("optimizer.lr=1e-3", "stage.learning_rate=2e-3")
    with pytest.raises(ConfigError, match=r"optimizer.lr=0.001 and stage.learning_rate=0.002 disagree"):
        validate(cfg)


def test_an_optimizer_with_its_own_weight_decay_keeps_it_beside_the_stage_value(make_cfg):
    cfg = make_cfg("optimizer=adam", "stage.weight_decay=0.1")  # adam.yaml: weight_decay 0.0 (coupled L2)
    validate(cfg)
    assert cfg.optimizer.weight_decay == 0.0 and cfg.stage.weight_decay == 0.1


def test_a_model_preset_brings_its_recipe_unless_the_stage_or_the_command_line_sets_one(tmp_path):
    def stage_of(*overrides):
        return compose_train("hardware=cpu", "tracking=none", *overrides, run_dir=tmp_path / "run").stage

    small = stage_of("model=gpt_small")
    recipe = (small.learning_rate, small.warmup_ratio, small.weight_decay, small.batch_size_per_gpu)
    assert recipe == (6e-4, 0.04, 0.1, 16)
    assert stage_of("model=gpt_tiny").learning_rate == 3e-3 and stage_of("model=custom").learning_rate == 3e-3
    assert stage_of("model=gpt_small", "stage.learning_rate=1e-3").learning_rate == 1e-3  # the command line wins
    assert stage_of("model=gpt_small", "stage=distill").learning_rate == 6e-4
    sft = stage_of("model=gpt_small", "stage=sft")  # SFT's own recipe
    assert (sft.learning_rate, sft.weight_decay) == (1e-3, 0.0)


def test_the_recipe_is_settled_into_the_stage_and_a_key_the_stage_lacks_is_refused(tmp_path):
    cfg = compose_train("model=gpt_small", "hardware=cpu", "tracking=none", run_dir=tmp_path / "run")
    assert validate(cfg).stage.learning_rate == 6e-4
    assert "recipe" not in cfg.model and cfg.stage.learning_rate == 6e-4 and cfg.optimizer.lr == 6e-4
    bad = compose_train("+model.recipe.learning_rat=1e-3", "hardware=cpu", "tracking=none", run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^model\.recipe\.learning_rat: not a stage key"):
        validate(bad)
