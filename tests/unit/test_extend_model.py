"""A user's own model: a plain nn.Module trains, plans, exports and generates through the model protocol
(exp.model.protocol), and a config.yaml names its class only where the user allows that package."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_model
from torch import nn

from exp.checkpoint import CheckpointError, build_model
from exp.config import ConfigError, validate
from exp.model import GPT
from exp.model.protocol import flops_per_token, generate, logits_of, model_spec, num_params

from ..conftest import TINY, compose_train

V = 264


class TinyLM(nn.Module):
    """A user's model: an embedding and a linear head. forward returns the logits only; it has no
    num_params, flops_per_token or generate, and declares neither vocab_size nor seq_len."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx))


class Windowed(TinyLM):
    """Declares seq_len (through a config dict) and refuses longer inputs, as a positional model would."""

    def __init__(self, vocab_size: int, seq_len: int):
        super().__init__(vocab_size, seq_len)
        self.config = {"seq_len": seq_len, "n_layer": 2, "d_model": 32}

    def forward(self, idx):
        assert idx.shape[1] <= self.config["seq_len"], idx.shape
        return (super().forward(idx), None)  # a tuple: the logits come first


class Kwargs(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw


def test_protocol_defaults_for_a_plain_module():
    torch.manual_seed(0)
    model = TinyLM(V, 16)
    assert num_params(model) == V * 32 + 32 * V + V
    assert num_params(model, exclude_embeddings=True) == 32 * V + V
    assert flops_per_token(model, 16) == 6 * num_params(model)
    assert model_spec(model) == (V, None)  # vocab_size read off a one-token forward
    idx = torch.tensor([[1, 2, 3]])
    greedy = generate(model, idx, 5, temperature=0.0)
    assert greedy.shape == (1, 8) and torch.equal(greedy[:, :3], idx)
    assert torch.equal(generate(model, idx, 5, temperature=0.0), greedy)
    stop = int(greedy[0, 3])
    assert generate(model, idx, 5, temperature=0.0, stop_token_ids=[stop]).shape == (1, 4)
    sampled = [generate(model, idx, 6, generator=torch.Generator().manual_seed(1), top_k=5) for _ in range(2)]
    assert torch.equal(*sampled)

    windowed = Windowed(V, 4)  # a tuple from forward, seq_len from its config: generation crops to it
    assert model_spec(windowed) == (V, 4)
    assert flops_per_token(windowed, 4) == 6 * num_params(windowed) + 12 * 2 * 32 * 4
    assert generate(windowed, idx, 6, temperature=0.0).shape == (1, 9)
    logits = torch.zeros(1, 2, V)
    assert all(logits_of(out) is logits for out in (logits, (logits, None), {"logits": logits}))
    with pytest.raises(TypeError, match="must return the logits"):
        logits_of(None)

    gpt = GPT(V, 16, 1, 2, 16)  # GPT answers with its own methods
    assert num_params(gpt, exclude_embeddings=True) == gpt.num_params(exclude_embeddings=True)
    assert flops_per_token(gpt, 16) == gpt.flops_per_token() and model_spec(gpt) == (V, 16)


def test_config_targets_are_built_only_from_allowed_packages(monkeypatch):
    monkeypatch.delenv("EXP_ALLOWED_TARGETS", raising=False)
    cfg = {"_target_": "tests.unit.test_extend_model.TinyLM", "vocab_size": V, "seq_len": 8}
    with pytest.raises(CheckpointError) as info:
        build_model(cfg, "run/config.yaml")
    assert str(info.value) == (
        "run/config.yaml: model _target_ 'tests.unit.test_extend_model.TinyLM' is not allowed "
        "(allowed: exp.model.GPT, exp.model.HFCausalLM); "
        "if you trust that code, allow it with --allow-target tests.unit.test_extend_model. "
        "(python -m exp.export, exp.generate) or EXP_ALLOWED_TARGETS=tests.unit.test_extend_model."
    )
    for allow in (["test"], ["tests.unit.test_extend_model.Tiny"]):  # a prefix ends at a dot
        with pytest.raises(CheckpointError, match="is not allowed"):
            build_model(cfg, "x", allow)
    for allow in (["tests."], ["tests"], ["tests.unit.test_extend_model.TinyLM"]):
        assert isinstance(build_model(cfg, "x", allow), TinyLM)
    monkeypatch.setenv("EXP_ALLOWED_TARGETS", "other_pkg., tests.unit.test_extend_model.")
    assert isinstance(build_model(cfg, "x"), TinyLM)
    # allowed or not, only nn.Module classes are built, and nested nodes arrive as plain data
    with pytest.raises(CheckpointError, match="'os.system' is a builtin_function_or_method, not a class or function"):
        build_model({"_target_": "os.system", "command": "true"}, "x", ["os."])
    nested = {"_target_": "os.system", "command": "true"}
    built = build_model({"_target_": "tests.unit.test_extend_model.Kwargs", "sub": nested}, "x")
    assert built.kw == {"sub": nested}


def test_a_user_model_teacher_needs_its_package_allowed(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"  # an export folder of a TinyLM
    teacher.mkdir()
    save_model(TinyLM(V, 32), str(teacher / "model.safetensors"))
    config = {"_target_": "tests.unit.test_extend_model.TinyLM", "vocab_size": V, "seq_len": 32}
    (teacher / "config.yaml").write_text(OmegaConf.to_yaml(config))
    cfg = compose_train(*TINY, "stage=distill", f"stage.teacher.path={teacher}", run_dir=tmp_path / "run")
    monkeypatch.delenv("EXP_ALLOWED_TARGETS", raising=False)
    with pytest.raises(ConfigError, match=r"stage.teacher.path=\S+: model _target_ 'tests\S+TinyLM' is not allowed"):
        validate(cfg)  # refused before the run starts
    monkeypatch.setenv("EXP_ALLOWED_TARGETS", "tests.")
    stage = validate(cfg).stage
    stage.setup(None, SimpleNamespace(device="cpu", dtype=torch.float32))
    student = GPT(V, 32, 1, 2, 16)
    x = torch.randint(0, V, (2, 8))
    out = stage.train_step(student, (x, x))  # the teacher's forward returns logits only
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["kd_loss"])
