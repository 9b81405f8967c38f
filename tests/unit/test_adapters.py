"""LoRA through peft (exp.model.adapters): bad model.adapter values refused naming the key, the dry run's counts,
merging, the base's fingerprint, and the fused qkv's adapter split into q/k/v_proj for the peft export."""

import pytest
import torch
from torch import nn

from exp.config import ConfigError, validate
from exp.export.peft import PEFT_PREFIX, hf_adapter_tensors
from exp.model import GPT, adapters
from exp.plan import format_plan, make_plan

from ..conftest import TINY, compose_train, make_export


class EmbeddingLM(nn.Module):
    """A user's model without a single nn.Linear: logits straight from an embedding table."""

    def __init__(self, vocab_size: int, seq_len: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx):
        return self.table(idx)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("base") / "export", n_head=4)


def lora(*overrides, base=None):
    init = [f"stage.init_from={base}"] if base else []
    return ["+model/adapter=lora", *init, *overrides]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.adapter.r=0"], r"^model\.adapter\.r=0 must be an integer >= 1"),
        (["model.adapter.r=2.5"], r"^model\.adapter\.r=2\.5 must be an integer >= 1"),
        (["model.adapter.alpha=0"], r"^model\.adapter\.alpha=0 must be a number > 0"),
        (["model.adapter.alpha=abc"], r"^model\.adapter\.alpha='abc' must be a number > 0"),
        (["model.adapter.dropout=1.0"], r"^model\.adapter\.dropout=1\.0 must be in \[0, 1\)"),
        (["model.adapter.dropout=-0.1"], r"^model\.adapter\.dropout=-0\.1 must be in \[0, 1\)"),
        (["model.adapter.kind=dora"], r"^model\.adapter\.kind='dora' must be one of lora"),
        (["+model.adapter.rank=4"], r"^model\.adapter\.rank: unknown key \(known: alpha, dropout, kind, r, target\)"),
        (["model.adapter.target=nomatch"], r"^model\.adapter\.target='nomatch' matches no linear layer of GPT \(they"),
        (["model.adapter.target=lm_head"], r"^model\.adapter\.target='lm_head' matches lm_head, whose weight is tied"),
        (["model.adapter.target='a('"], r"^model\.adapter\.target='a\(' is not a regular expression"),
        (["hardware.distributed=fsdp"], r"^model\.adapter: hardware\.distributed=fsdp"),
    ],
)
def test_bad_adapter_values_are_refused_naming_the_key(tmp_path, base, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_train(*TINY, *lora(*overrides, base=base), run_dir=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_adapter_needs_a_base_and_a_model_with_linear_layers(tmp_path, base):
    with pytest.raises(ConfigError, match=r"^model\.adapter needs stage\.init_from: the pretrained weights"):
        validate(compose_train(*TINY, *lora(), run_dir=tmp_path / "a"))
    custom = ["model=custom", f"model._target_={__name__}.EmbeddingLM", "model.seq_len=32"]
    overrides = [*(o for o in TINY if not o.startswith("model")), *custom]
    with pytest.raises(
        ConfigError, match=r"^model\.adapter: LoRA goes on linear layers \(nn\.Linear\), and EmbeddingLM has none"
    ):
        validate(compose_train(*overrides, *lora("model.adapter.target=table", base=base), run_dir=tmp_path / "b"))
    validate(compose_train(*overrides, run_dir=tmp_path / "c"))  # the same model without an adapter is fine


def test_the_dry_run_counts_trainable_and_frozen_parameters_and_the_optimizer_state_saved(tmp_path, base):
    cfg = compose_train(*TINY, *lora("model.adapter.r=4", base=base), run_dir=tmp_path / "run")
    valid = validate(cfg)
    plan = make_plan(cfg, valid.stage, valid.hardware)
    full = GPT(vocab_size=264, seq_len=32, n_layer=2, n_head=4, d_model=64)
    n = full.num_params()
    # per layer: qkv 64->192, proj 64->64, gate/up 64->192, down 192->64: r * (in + out) each
    per_layer = 4 * ((64 + 192) + (64 + 64) + 2 * (64 + 192) + (192 + 64))
    assert plan["num_trainable_params"] == 2 * per_layer and plan["num_frozen_params"] == n
    assert plan["memory_bytes"]["optimizer"] == 2 * 4 * 2 * per_layer  # AdamW: two states, fp32
    assert plan["optimizer_state_saved"] == 2 * 4 * n
    text = format_plan(plan)
    assert f"trainable         {2 * per_layer:,} parameters" in text and f"{n:,} frozen (lora r=4" in text
    assert "on 10 layers" in text and "saved against training every parameter" in text


def adapted_gpt(n_kv_head=2, seed=0) -> GPT:
    """A GPT with a LoRA everywhere the default target finds, its B random (a fresh LoRA's B is zero)."""
    torch.manual_seed(seed)
    model = GPT(vocab_size=264, seq_len=32, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32).eval()
    adapters.inject(model, adapters.AdapterConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    return model


def test_merging_folds_the_adapter_into_plain_weights_with_the_same_logits():
    model = adapted_gpt()
    x = torch.randint(264, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)[0]
        merged = adapters.merge(model)
        after = merged(x)[0]
    assert type(merged.blocks[0].attn.qkv) is nn.Linear and adapters.info(merged) is None
    assert set(merged.state_dict()) == set(GPT(264, 32, 2, 4, 32, n_kv_head=2).state_dict())
    assert (before - after).abs().max() < 1e-5


def test_only_the_adapter_trains_and_the_fingerseensees_one_changed_weight():
    torch.manual_seed(0)
    model = GPT(vocab_size=264, seq_len=32, n_layer=2, n_head=4, d_model=32)
    seen = adapters.fingerprint(model)
    assert adapters.fingerprint(model) == seen
    weight = model.blocks[1].mlp.down.weight
    with torch.no_grad():
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(9.0))  # one ulp
    assert adapters.fingerprint(model) != seen
    adapters.inject(model, adapters.AdapterConfig(r=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert set(adapters.adapter_tensors(model)) == {n.replace(".default.", ".") for n in trainable}


def test_the_fused_qkv_adapter_splits_into_q_k_v_with_the_same_update():
    model = adapted_gpt(n_kv_head=2)  # GQA: q has 4 heads of rows, k and v 2 each
    tensors = hf_adapter_tensors(adapters.adapter_tensors(model), model)
    qkv = model.blocks[1].attn.qkv
    fused = qkv.lora_B.default.weight @ qkv.lora_A.default.weight  # (32 + 16 + 16, 32)
    parts = []
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"{PEFT_PREFIX}model.layers.1.self_attn.{name}"
        assert torch.equal(tensors[f"{key}.lora_A.weight"], qkv.lora_A.default.weight)
        parts.append(tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"])
    assert [p.shape[0] for p in parts] == [32, 16, 16]
    assert torch.equal(torch.cat(parts), fused)
    down = model.blocks[0].mlp.down
    assert torch.equal(tensors[f"{PEFT_PREFIX}model.layers.0.mlp.down_proj.lora_B.weight"], down.lora_B.default.weight)
    assert len(tensors) == 2 * 2 * (3 + 4)  # two layers, A and B, q/k/v + o/gate/up/down
