"""stage=dpo and its data: preference record formats, paired batches, the built-in set, and the loss checked
against TRL's DPO trainer on the HF exports of the same policy and reference."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exp import export
from exp.data.preference import (
    PairSampler,
    PreferenceJsonl,
    PreferencePyStdlib,
    fit_pairs,
    parse_pair,
    shuffled_lines,
)
from exp.data.sft.sources import SFTDataError
from exp.data.sft.template import encode_arrays
from exp.data.tokenizer import PAD
from exp.losses import IGNORE_INDEX, dpo_loss
from exp.stages import DPO, SFT

from .test_export_hf import write_checkpoint

USER = {"role": "user", "content": "Say hi."}


def turns(role, content):
    return [{"role": role, "content": content}]


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "Say hi.", "chosen": "Hello!", "rejected": "Go away."},
        # UltraFeedback-binarized: the prompt twice, as a string and as the lists' first turn
        {
            "prompt": "Say hi.",
            "chosen": [USER, {"role": "assistant", "content": "Hello!"}],
            "rejected": [USER, {"role": "assistant", "content": "Go away."}],
        },
        # Anthropic HH as published in message lists: no prompt field, the shared turns are the prompt
        {
            "chosen": [USER, {"role": "assistant", "content": "Hello!"}],
            "rejected": [USER, {"role": "assistant", "content": "Go away."}],
        },
        # TRL's conversational form: the prompt as turns, the responses as assistant turns
        {
            "prompt": [USER],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
    ],
    ids=["strings", "ultrafeedback", "hh", "trl_conversational"],
)
def test_every_format_gives_the_same_pair(record):
    assert parse_pair(record) == ([USER], turns("assistant", "Hello!"), turns("assistant", "Go away."))


def test_multi_turn_conversations_part_at_the_first_different_assistant_turn():
    shared = [USER, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again."}]
    record = {
        "chosen": [*shared, {"role": "assistant", "content": "Hi!"}],
        "rejected": [*shared, *turns("assistant", "No")],
    }
    assert parse_pair(record) == (shared, turns("assistant", "Hi!"), turns("assistant", "No"))


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p", "chosen": "a"}, "missing field(s) rejected (keys: [chosen, prompt])"),
        ({"chosen": "a", "rejected": "b"}, "missing field prompt"),
        ({"prompt": "p", "chosen": "a", "rejected": "  "}, "the rejected response is empty"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "the chosen response is empty"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen' is int, not a string"),
        (
            {
                "chosen": [USER, *turns("assistant", "a")],
                "rejected": [*turns("user", "other"), *turns("assistant", "b")],
            },
            "share no leading turn",
        ),
        (
            {
                "chosen": [USER, *turns("user", "x"), *turns("assistant", "a")],
                "rejected": [USER, *turns("assistant", "b")],
            },
            "chosen[1] is a user turn where the two conversations part",
        ),
    ],
    ids=[
        "no-rejected",
        "no-prompt",
        "empty-rejected",
        "empty-chosen",
        "not-a-string",
        "no-shared-turn",
        "prompt-differs",
    ],
)
def test_bad_pairs_are_refused_with_what_is_wrong(record, message):
    with pytest.raises(ValueError) as e:
        parse_pair(record)
    assert message in str(e.value)


def test_a_bad_record_names_its_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "p"}))
    data = PreferenceJsonl(path=str(path), seq_len=32, val_path=str(path))
    with pytest.raises(SFTDataError, match=rf"^data.path={path}:2: missing field\(s\) chosen, rejected"):
        data.examples()


def encoded(prompt: str, chosen: str, rejected: str):
    p = turns("user", prompt)
    return encode_arrays(p + turns("assistant", chosen)), encode_arrays(p + turns("assistant", rejected))


def test_pairs_keep_the_prompt_cut_the_responses_and_count_the_dropped():
    pairs, counts = fit_pairs(
        [
            encoded("p" * 5, "a" * 40, "b" * 3),  # chosen cut
            encoded("p" * 30, "a", "b"),  # the prompt fills the window: dropped
            encoded("p" * 5, "c" * 40, "c" * 30),  # the same after the cut: dropped
            encoded("q", "yes", "no"),
        ],
        row_len=20,
        pad=PAD,
    )
    assert (counts["num_pairs"], counts["num_dropped"], counts["num_identical"], counts["num_truncated"]) == (
        2,
        1,
        1,
        1,
    )
    assert len(pairs.chosen) == len(pairs.rejected) == 2
    first = pairs.chosen.tokens[pairs.chosen.offsets[0] : pairs.chosen.offsets[1]]
    assert len(first) == 20 and bytes(first[1:6].astype(np.uint8)) == b"ppppp"  # the prompt kept whole
    assert counts["num_truncated_tokens"] == len(encoded("p" * 5, "a" * 40, "b")[0][0]) - 20


def write_pairs(path, n=24):
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"prompt": f"Q{i}: say {i}", "chosen": f"A: {i} " * (1 + i % 3), "rejected": "no" * (1 + i % 4)}
                )
            )
            f.write("\n")
    return path


def test_a_batch_is_the_chosen_rows_then_their_rejected_rows_and_resumes(tmp_path):
    data = PreferenceJsonl(path=str(write_pairs(tmp_path / "p.jsonl")), seq_len=48, val_fraction=0.2)
    train, _ = data.examples()
    sampler = data.train_sampler(batch_size=3, seed=7)
    assert isinstance(sampler, PairSampler)
    x, y = next(sampler)
    assert x.shape == y.shape == (6, 48)
    for i in range(3):  # row i and row 3 + i: one pair, the same prompt, different responses
        first = int((y[i] != IGNORE_INDEX).nonzero()[0])
        assert first == int((y[3 + i] != IGNORE_INDEX).nonzero()[0])
        assert torch.equal(x[i, :first], x[3 + i, :first]) and not torch.equal(x[i], x[3 + i])
        prompt = bytes(x[i, 1:first].numpy().astype(np.uint8)).decode()
        assert prompt.startswith("Q") and "say" in prompt
    state = sampler.state_dict()
    expected = [next(sampler) for _ in range(5)]
    again = data.train_sampler(batch_size=3, seed=7)
    again.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, [next(again) for _ in range(5)], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    val = data.val_batches(batch_size=2, num_batches=2)
    assert [b[0].shape for b in val] == [(4, 48)] * len(val) and len(val) >= 1
    assert data.epoch_size() == len(train)


def test_the_built_in_set_prefers_each_real_body_over_its_shuffled_lines(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(4))
    code = "".join(f'def f{k}(a):\n    """Function {k}."""\n{body}\n    return a + {k}\n\n\n' for k in range(30))
    (root / "mod_a.py").write_text(code)
    (root / "mod_b.py").write_text(code.replace("def f", "def g"))
    data = PreferencePyStdlib(seq_len=200, cache_dir=str(tmp_path / "cache"), root=str(root), val_fraction=0.3)
    train, val = data.pairs()
    assert len(train) + len(val) == 60 and train and val
    for prompt, chosen, rejected in train + val:
        real, shuffled = chosen[0]["content"], rejected[0]["content"]
        assert prompt[0]["content"].startswith(("def f", "def g")) and "Function" in prompt[0]["content"]
        assert real.split("\n")[0] != shuffled.split("\n")[0]
        assert sorted(real.split("\n")) == sorted(shuffled.split("\n"))
    again = PreferencePyStdlib(seq_len=200, cache_dir=str(tmp_path / "cache"), root=str(root), val_fraction=0.3)
    assert again.pairs() == (train, val)  # the same shuffles on every build and machine
    assert shuffled_lines("one line", "k") is None and shuffled_lines("a\na", "k") is None
    assert shuffled_lines("a\nb\nc", "k") == shuffled_lines("a\nb\nc", "k") != "a\nb\nc"
    for key in map(str, range(50)):  # the rejected body differs from its first line on
        assert shuffled_lines("a\nb\nc", key).split("\n")[0] != "a"
        assert shuffled_lines("a\na\na\na\nb", key).startswith("b")


def test_the_loss_is_dpo_ipo_and_conservative_dpo_by_their_definitions():
    torch.manual_seed(0)
    logits, ref = torch.randn(4, 5, 11), torch.randn(4, 5, 11)
    y = torch.randint(11, (4, 5))
    y[:, :2] = IGNORE_INDEX  # the prompt
    y[1, 4] = IGNORE_INDEX  # a shorter response
    lp = lambda lg: (torch.log_softmax(lg, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)).sum(1)
    r = lp(logits) - lp(ref)
    d = 0.3 * (r[:2] - r[2:])
    out = dpo_loss(logits, ref, y, beta=0.3)
    torch.testing.assert_close(out["loss"], -F.logsigmoid(d).mean())
    torch.testing.assert_close(out["rewards/margins"], d.mean())
    torch.testing.assert_close(out["logps/rejected"], lp(logits)[2:].mean())
    smooth = dpo_loss(logits, ref, y, beta=0.3, label_smoothing=0.2)["loss"]
    torch.testing.assert_close(smooth, (-0.8 * F.logsigmoid(d) - 0.2 * F.logsigmoid(-d)).mean())
    n = (y != -100).sum(1)
    ipo = ((r[:2] / n[:2] - r[2:] / n[2:]) - 1 / (2 * 0.3)) ** 2
    torch.testing.assert_close(dpo_loss(logits, ref, y, beta=0.3, loss_type="ipo")["loss"], ipo.mean())


def trl_examples(x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """TRL's tokenized pairs (prompt_ids, chosen_ids, rejected_ids) of exp's batch: the completion is what exp
    labels."""
    n = x.size(0) // 2
    ids = torch.cat([x, y[:, -1:].clamp(min=0)], 1)  # the row's tokens (x, then y's last target)
    out = []
    for i in range(n):
        parts = []
        for row in (i, n + i):
            labelled = (y[row] != IGNORE_INDEX).nonzero()[:, 0] + 1  # label of position t is the token at t + 1
            parts.append((int(labelled[0]), int(labelled[-1]) + 1))
        (start, end_c), (start_r, end_r) = parts
        assert start == start_r
        prompt = ids[i, :start].tolist()
        out.append(
            {
                "prompt_ids": prompt,
                "chosen_ids": ids[i, start:end_c].tolist(),
                "rejected_ids": ids[n + i, start:end_r].tolist(),
            }
        )
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_exp_gives_trls_dpo_loss_rewards_and_logps_on_the_exported_models(tmp_path, loss_type):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy_ckpt, policy = write_checkpoint(tmp_path / "policy", seed=1)
    ref_ckpt, _ = write_checkpoint(tmp_path / "ref", seed=2)
    for name, ckpt in (("policy_hf", policy_ckpt), ("ref_hf", ref_ckpt)):
        assert export.main([str(ckpt), str(tmp_path / name), "--format", "hf"]) == 0
    data = PreferenceJsonl(path=str(write_pairs(tmp_path / "p.jsonl")), seq_len=32, val_fraction=0.2)
    x, y = next(data.train_sampler(batch_size=4, seed=3))

    stage = DPO(
        name="dpo",
        num_steps=1,
        batch_size_per_gpu=4,
        learning_rate=1e-3,
        init_from=str(ref_ckpt),
        beta=0.2,
        loss_type=loss_type,
    )
    stage.setup(policy, type("Rt", (), {"device": torch.device("cpu"), "dtype": torch.float32})())
    ours = stage.train_step(policy, (x, y))

    load = lambda name: AutoModelForCausalLM.from_pretrained(tmp_path / name, local_files_only=True).float()
    hf_policy, hf_ref = load("policy_hf"), load("ref_hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy_hf")
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        beta=0.2,
        loss_type=[loss_type],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
    )
    rows = Dataset.from_list([{"prompt": "Say hi.", "chosen": "Hello", "rejected": "No"}] * 2)
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, train_dataset=rows, processing_class=tokenizer)
    inputs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(trl_examples(x, y))
    hf_policy.train()
    with torch.no_grad():
        loss = trainer.compute_loss(hf_policy, inputs)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert abs(loss.item() - ours["loss"].item()) < 1e-5, (loss.item(), ours["loss"].item())
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert abs(theirs[key] - ours[key].item()) < 1e-5 * max(1.0, abs(theirs[key])), (key, theirs[key], ours[key])


def test_dpo_needs_a_reference_and_pairs_and_other_stages_refuse_pairs(tmp_path):
    common = dict(name="dpo", num_steps=1, batch_size_per_gpu=1, learning_rate=1e-3)
    with pytest.raises(ValueError, match="stage.init_from is required: DPO starts from a trained model"):
        DPO(**common)
    with pytest.raises(ValueError, match=r"stage.loss_type='hinge' must be one of sigmoid, ipo"):
        DPO(**common, init_from=str(tmp_path), loss_type="hinge")
    with pytest.raises(ValueError, match=r"stage.label_smoothing=0.1 is for loss_type=sigmoid"):
        DPO(**common, init_from=str(tmp_path), loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"stage.beta=0 must be > 0"):
        DPO(**common, init_from=str(tmp_path), beta=0)
    pairs = PreferenceJsonl(path=str(write_pairs(tmp_path / "p.jsonl")), seq_len=32)
    with pytest.raises(ValueError, match="data=preference_jsonl gives preference pairs .* use stage=dpo"):
        SFT(**{**common, "name": "sft"}).check_data(pairs)
    with pytest.raises(ValueError, match="stage=dpo trains on preference pairs, and data=sft_pystdlib gives none"):
        DPO(**common, init_from=str(tmp_path)).check_data(type("D", (), {"name": "sft_pystdlib"})())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stage=sft", "data=preference_jsonl"], "stage: data=preference_jsonl gives preference pairs"),
        (["stage=dpo", "data=sft_pystdlib"], "stage: stage=dpo trains on preference pairs, and data=sft_pystdlib"),
    ],
    ids=["sft-on-pairs", "dpo-on-sft-data"],
)
def test_validation_refuses_a_stage_and_data_that_do_not_pair(tmp_path, overrides, message):
    from exp.config import validate
    from exp.errors import ConfigError

    from ..conftest import TINY, compose_train, make_export

    extra = [f"stage.init_from={make_export(tmp_path / 'sft')}"] if "stage=dpo" in overrides else []
    if "data=preference_jsonl" in overrides:
        extra.append(f"data.path={write_pairs(tmp_path / 'p.jsonl')}")
    cfg = compose_train(*TINY, *overrides, *extra, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate(cfg)
