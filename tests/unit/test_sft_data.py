"""SFT data: chat template and masks, record formats, JSONL errors, padding/packing, sampler, stdlib pairs."""

import importlib.util
import json
import pickle

import numpy as np
import pytest
import torch

from exp.config import validate
from exp.data import DataError
from exp.data.corpus import split_value
from exp.data.sft import (
    SFTDataError,
    SFTJsonl,
    SFTPyStdlib,
    encode_arrays,
    encode_chat,
    fit_examples,
    function_pairs,
    make_batch,
    pack_rows,
    parse_record,
    pystdlib_sft,
)
from exp.data.sft import stdlib as sft_stdlib
from exp.data.tokenizer import EOT, PAD, ByteTokenizer

from ..conftest import compose_train

SYS, USER, ASSISTANT, END = (ByteTokenizer.specials[f"<|{n}|>"] for n in ("system", "user", "assistant", "end"))
X = -100
HI_YO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa(i, answer_len=None):
    """A distinct prompt/response record."""
    return {"prompt": f"question {i}?", "response": f"answer {i} " + "z" * (answer_len if answer_len else i % 7)}


def labelled_text(labels):
    return ByteTokenizer().decode([t for t in labels if t != X])


# template and formats


def test_template_exact_ids_and_labels():
    ids, labels = encode_chat(HI_YO)
    assert ids == [USER, ord("h"), ord("i"), END, ASSISTANT, ord("y"), ord("o"), END, EOT]
    assert labels == [X, X, X, X, X, ord("y"), ord("o"), END, X]
    # after the shift each target sits on the position that predicts it: <|assistant|> -> "y", ..., "o" -> <|end|>
    x, y = ids[:-1], labels[1:]
    assert [(a, b) for a, b in zip(x, y, strict=True) if b != X] == [
        (ASSISTANT, ord("y")),
        (ord("y"), ord("o")),
        (ord("o"), END),
    ]


def test_every_format_gives_the_same_layout(tmp_path):
    records = {
        "messages": {"messages": HI_YO},
        "conversations": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        "prompt_response": {"prompt": "hi", "response": "yo"},
        "prompt_completion": {"prompt": "hi", "completion": "yo"},
        "fields": {"instruction": "hi", "input": "", "output": "yo"},
    }
    fields = ["instruction", "input", "output"]
    expected = encode_chat(HI_YO)
    for name, record in records.items():
        assert encode_chat(parse_record(record, fields=fields)) == expected, name
        # through the whole file path too, with the format detected
        f = write_jsonl(tmp_path / f"{name}.jsonl", [record, record])
        data = SFTJsonl(str(f), seq_len=32, fields=fields if name == "fields" else None, val_path=str(f))
        train, val = data.examples()
        assert train.tokens.tolist() == expected[0] * 2 and train.labels.tolist() == expected[1] * 2, name
    joined = parse_record({"instruction": "a", "input": "b", "output": "c"}, "fields", fields)
    assert joined == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]
    assert parse_record({"prompt": "p", "response": "r", "x": 1}, "fields", ["prompt", "response"]) == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"},
    ]


def test_multi_turn_labels_only_assistant_turns():
    turns = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "A2"},
    ]
    ids, labels = encode_chat(turns)
    assert ByteTokenizer().decode(ids) == (
        "<|system|>be brief<|end|><|user|>q1<|end|><|assistant|>A1<|end|><|user|>q2<|end|><|assistant|>A2<|end|>"
        "<|endoftext|>"
    )
    assert labelled_text(labels) == "A1<|end|>A2<|end|>"
    assert all(lab in (X, tok) for tok, lab in zip(ids, labels, strict=True))
    assert ids[0] == SYS and labels[-1] == X


def test_bad_records_name_what_is_wrong():
    for record, match in [
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"prompt": "p", "response": 3}, "not a string"),
        ({"conversations": "text"}, "not a list"),
        ([1, 2], "JSON object"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_record(record)
    with pytest.raises(ValueError, match="missing field.*input"):
        parse_record({"instruction": "i", "output": "o"}, "fields", ["instruction", "input", "output"])


# JSONL sources and config checks


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(qa(1)) + "\n\n{not json\n")
    with pytest.raises(SFTDataError, match=r"^data\.path=.*bad\.jsonl:3: not valid JSON"):
        SFTJsonl(str(bad_json), seq_len=32).check()  # found in validation, not when the run reads the data
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [qa(1), {"text": "x", "label": 1}])
    with pytest.raises(SFTDataError, match=r"unknown\.jsonl:2: no recognisable format in keys \[label, text\]"):
        SFTJsonl(str(unknown), seq_len=32).examples()
    good = write_jsonl(tmp_path / "good.jsonl", [qa(1), qa(2)])
    with pytest.raises(SFTDataError, match=r"^data\.val_path=.*unknown\.jsonl:2: no recognisable format"):
        SFTJsonl(str(good), seq_len=32, val_path=str(unknown)).check()
    assert issubclass(SFTDataError, ValueError) and issubclass(SFTDataError, DataError)


def test_check_rereads_a_file_that_changed(tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [qa(i) for i in range(4)])
    SFTJsonl(str(f), seq_len=32).check()
    SFTJsonl(str(f), seq_len=32).check()  # remembered as passed for this size and mtime, not for the path
    with open(f, "a") as out:
        out.write("{not json\n")
    with pytest.raises(SFTDataError, match=r"chat\.jsonl:5: not valid JSON"):
        SFTJsonl(str(f), seq_len=32).check()


def test_check_names_the_key(tmp_path):
    with pytest.raises(DataError, match=r"^data\.path=.*missing\.jsonl does not exist$"):
        SFTJsonl(str(tmp_path / "missing.jsonl"), seq_len=32).check()
    f = write_jsonl(tmp_path / "ok.jsonl", [qa(1), qa(2)])
    with pytest.raises(DataError, match=r"^data\.val_path=.* is not a file"):
        SFTJsonl(str(f), seq_len=32, val_path=str(tmp_path)).check()
    with pytest.raises(DataError, match="data.format=yaml"):
        SFTJsonl(str(f), seq_len=32, format="yaml")
    with pytest.raises(DataError, match="data.fields must list"):
        SFTJsonl(str(f), seq_len=32, format="fields")
    SFTJsonl(str(f), seq_len=32).check()
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DataError, match=r"data\.path=hf:org/set needs .*datasets.* not installed"):
            SFTJsonl("hf:org/set", seq_len=32).check()


def test_yaml_configs_validate(tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [qa(i) for i in range(4)])
    for overrides in (["data=sft_pystdlib"], ["data=sft_jsonl", f"data.path={f}", "data.packing=true"]):
        cfg = compose_train("hardware=cpu", "tracking=none", *overrides, run_dir=tmp_path / "run")
        validate(cfg)  # every key is a constructor parameter, and check() passes
        assert cfg.data.seq_len == cfg.model.seq_len and cfg.data.vocab_size == 264


# padding, packing, truncation


def test_padding_rows_match_the_template(tmp_path):
    records = [qa(i) for i in range(6)]
    f = write_jsonl(tmp_path / "chat.jsonl", records)
    data = SFTJsonl(str(f), seq_len=40, val_path=str(f))
    (x, y), *_ = data.val_batches(batch_size=6, num_batches=1)
    assert x.shape == y.shape == (6, 40) and x.dtype == y.dtype == torch.int64
    for r, row_x, row_y in zip(records, x.tolist(), y.tolist(), strict=True):
        ids, labels = encode_chat(parse_record(r))
        pad = 41 - len(ids)  # rows hold seq_len + 1 tokens: x drops the last, y the first
        assert row_x == (ids + [PAD] * pad)[:-1] and row_y == (labels + [X] * pad)[1:]
    assert data.stats()["num_truncated"] == 0 and data.stats()["fill_ratio"] < 1


def test_packing_fills_rows_with_whole_examples(tmp_path):
    records = [qa(i) for i in range(20)]
    f = write_jsonl(tmp_path / "chat.jsonl", records)
    data = SFTJsonl(str(f), seq_len=63, packing=True, val_path=str(f))
    val = data.examples()[1]
    rows = pack_rows(val.lengths, range(len(val)), 64)
    assert [i for r in rows for i in r] == list(range(20))  # whole examples, in order
    for r, nxt in zip(rows, rows[1:], strict=False):
        assert val.lengths[r].sum() <= 64 < val.lengths[r].sum() + val.lengths[nxt[0]]  # the next did not fit
    batches = data.val_batches(batch_size=len(rows), num_batches=1)
    x, y = batches[0]
    assert x.shape == (len(rows), 63)
    encoded = [encode_chat(parse_record(r)) for r in records]
    for row, row_x, row_y in zip(rows, x.tolist(), y.tolist(), strict=True):
        ids = [t for i in row for t in encoded[i][0]]
        labels = [t for i in row for t in encoded[i][1]]
        pad = 64 - len(ids)
        assert row_x == (ids + [PAD] * pad)[:-1] and row_y == (labels + [X] * pad)[1:]  # masks carried over
    assert data.stats()["fill_ratio"] > SFTJsonl(str(f), seq_len=63, val_path=str(f)).stats()["fill_ratio"]


def test_truncation_and_dropping_are_counted():
    long_answer = {"prompt": "p", "response": "r" * 30}  # 1+1+1 + 1+30+1 + 1 = 36 tokens
    long_prompt = {"prompt": "p" * 30, "response": "r"}
    ok = {"prompt": "p", "response": "r"}
    ex, counts = fit_examples((encode_arrays(parse_record(r)) for r in (long_answer, long_prompt, ok)), 16)
    assert counts == {
        "num_examples": 2,
        "num_dropped": 1,
        "num_truncated": 1,
        "num_truncated_tokens": 36 - 16,
        "num_tokens": 16 + 7,
        "num_label_tokens": 16 - 4 + 2,
    }
    assert ex.lengths.tolist() == [16, 7]
    # a prompt that fills the row up to <|assistant|> leaves no target after the shift: dropped
    edge = {"prompt": "p" * 13, "response": "r"}  # <|user|> p*13 <|end|> <|assistant|> = 16 tokens
    assert fit_examples([encode_arrays(parse_record(edge))], 16)[1]["num_dropped"] == 1
    assert fit_examples([encode_arrays(parse_record(edge))], 17)[1]["num_truncated"] == 1


def test_all_dropped_is_a_data_error(tmp_path):
    f = write_jsonl(
        tmp_path / "chat.jsonl", [{"prompt": "p" * 50, "response": "r"}, {"prompt": "p" * 60, "response": "r"}]
    )
    message = (
        r"^data\.path=.*chat\.jsonl: all 2 train examples were dropped at data\.seq_len=8 "
        r"\(their prompts alone fill the window; the shortest needs seq_len >= 53\): use a larger model\.seq_len$"
    )
    with pytest.raises(DataError, match=message):
        SFTJsonl(str(f), seq_len=8, val_path=str(f)).check()
    with pytest.raises(DataError, match="all 2 train examples were dropped at data.seq_len=52 "):
        SFTJsonl(str(f), seq_len=52, val_path=str(f)).stats()
    kept = SFTJsonl(str(f), seq_len=53, val_path=str(f))  # the length the message asked for keeps one
    kept.check()
    assert kept.stats()["num_train_examples"] == 1
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "p" * 50, "response": "r"}])
    with pytest.raises(DataError, match=r"^data\.val_path=.*val\.jsonl: all 1 val examples were dropped"):
        SFTJsonl(str(write_jsonl(tmp_path / "short.jsonl", [qa(1)])), seq_len=16, val_path=str(val)).check()


# sampler


@pytest.fixture
def chat_data(tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [qa(i, answer_len=i % 11 + 1) for i in range(60)])
    return lambda **kw: SFTJsonl(str(f), **{"seq_len": 48, "val_fraction": 0.2, **kw})


def test_sampler_batches_shift_and_masks(chat_data):
    data = chat_data()
    x, y = next(data.train_sampler(batch_size=5, seed=0))
    assert x.shape == y.shape == (5, 48) and x.dtype == y.dtype == torch.int64
    mask = y[:, :-1] != X
    assert mask.any() and torch.equal(y[:, :-1][mask], x[:, 1:][mask])  # y is x shifted where it is a target
    assert (y[x == PAD] == X).all() and int(x.max()) < data.vocab_size
    train, val = data.examples()
    assert len(train) + len(val) == 60 and 0 < len(val) < 20


def test_holdout_is_by_content_and_deterministic(chat_data, tmp_path):
    train, val = chat_data().conversations()
    assert chat_data().conversations() == (train, val)
    texts = lambda convs: {c[1]["content"] for c in convs}
    assert not texts(train) & texts(val)


@pytest.mark.parametrize("packing", [False, True])
def test_sampler_resumes_exactly(chat_data, packing):
    data = chat_data(packing=packing)
    a = data.train_sampler(batch_size=7, seed=3)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(a) for _ in range(12)]  # runs over several epochs
    assert a.epoch >= 2
    b = chat_data(packing=packing).train_sampler(batch_size=7, seed=3)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, (next(b) for _ in range(12)), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = data.train_sampler(batch_size=7, seed=4)
    assert not torch.equal(next(c)[0], next(data.train_sampler(batch_size=7, seed=3))[0])
    halves = [data.train_sampler(batch_size=3, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in halves:  # the state is the shared stream's: two ranks of 3 take the rows one process of 6 would
        s.load_state_dict(state)
    assert torch.equal(torch.cat([next(s)[0] for s in halves]), torch.cat([x for x, _ in expected[:1]])[:6])


def test_ranks_take_disjoint_slices_and_epochs_reshuffle(chat_data):
    data = chat_data()
    n = len(data.examples()[0])

    def epoch_rows(rank, world_size):
        s = data.train_sampler(batch_size=1, seed=0, rank=rank, world_size=world_size)
        return [tuple(t for t in next(s)[0][0].tolist() if t != PAD) for _ in range(n // world_size)]

    r0, r1 = epoch_rows(0, 2), epoch_rows(1, 2)
    assert len(set(r0)) == len(r0) and len(set(r1)) == len(r1)  # no repeats within an epoch
    assert not set(r0) & set(r1) and len(r0) + len(r1) == n - n % 2
    assert set(r0) | set(r1) <= set(epoch_rows(0, 1))
    s = data.train_sampler(batch_size=1, seed=0)
    assert s.rows_for(0) != s.rows_for(1) and sorted(s.rows_for(0)) == sorted(s.rows_for(1))


def test_val_batches_are_fixed(chat_data):
    a = chat_data(packing=True).val_batches(batch_size=2, num_batches=3)
    b = chat_data(packing=True).val_batches(batch_size=2, num_batches=3)
    assert len(a) >= 1 and all(x.shape == (2, 48) for x, _ in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert all((y != X).any() for _, y in a)


def test_lazy_and_picklable(chat_data, tmp_path):
    data = SFTJsonl(str(tmp_path / "not-yet.jsonl"), seq_len=16)  # constructing reads nothing
    assert data.describe()["name"] == "sft_jsonl"
    data = chat_data()
    data.examples()
    clone = pickle.loads(pickle.dumps(data))
    assert clone._data is None and clone.stats() == data.stats()
    stats = data.stats()
    assert stats["completion_ratio"] == stats["num_label_tokens"] / stats["num_tokens"]
    assert {"num_examples", "num_dropped", "num_truncated", "completion_ratio"} <= set(data.describe())


def test_make_batch_empty_tail_is_padding():
    ex, _ = fit_examples([encode_arrays(HI_YO)], 16)
    x, y = make_batch(ex, [[0]], 16)
    assert x.shape == (1, 15) and x[0].tolist() == encode_chat(HI_YO)[0] + [PAD] * 6
    assert y[0].tolist() == encode_chat(HI_YO)[1][1:] + [X] * 7


# stdlib pairs

FAKE_MODULE = (
    '''"""A module."""
import functools


def documented(a, b=1):
    """Add two numbers.

    Returns the sum.
    """
    total = a + b
    return total


def undocumented(x):
    y = x
    return y


class Box:
    """A box."""

    @functools.cache
    def size(self,
             unit="cm"):
        """The size."""
        # a comment belongs to the body
        return f"""3
{unit}"""

    def no_doc(self):
        return 1


def too_long():
    """A body over the limit."""
'''
    + "    x = 1\n" * 41
)


def fake_stdlib(root, n=8):
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text(FAKE_MODULE)
    for i in range(n):
        (root / ("pkg" if i % 2 else "") / f"m{i}.py").write_text(
            f'def f{i}(x):\n    """Times {i}."""\n    return x * {i}\n\n\ndef g{i}():\n    return 0\n'
        )
    (root / "broken.py").write_text("def oops(:\n")
    (root / "test").mkdir()
    (root / "test" / "t.py").write_text('def t():\n    """In a test dir."""\n    return 1\n')
    return root


def test_function_pairs_prompt_is_signature_and_docstring():
    pairs = function_pairs(FAKE_MODULE)
    assert [p["line"] for p in pairs] == [5, 23]  # documented and Box.size; the rest has no docstring or is long
    doc, size = pairs
    assert doc["prompt"] == 'def documented(a, b=1):\n    """Add two numbers.\n\n    Returns the sum.\n    """\n'
    assert doc["completion"] == "    total = a + b\n    return total\n"
    assert size["prompt"] == '@functools.cache\ndef size(self,\n         unit="cm"):\n    """The size."""\n'
    assert size["completion"] == '    # a comment belongs to the body\n    return f"""3\n{unit}"""\n'  # string kept


def test_stdlib_set_splits_by_file_and_is_cached(tmp_path, monkeypatch):
    root = fake_stdlib(tmp_path / "lib")
    calls = []
    real = sft_stdlib.function_pairs
    monkeypatch.setattr(sft_stdlib, "function_pairs", lambda *a: calls.append(1) or real(*a))
    out = pystdlib_sft(tmp_path / "cache", root=root)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_files"] == 9 and meta["num_skipped_files"] == 1  # a.py + m0..m7; broken.py; test/ excluded
    assert meta["num_train_pairs"] + meta["num_val_pairs"] == 10
    files = {
        split: {json.loads(line)["source"].rsplit(":", 1)[0] for line in open(out / f"{split}.jsonl")}
        for split in ("train", "val")
    }
    assert files["train"] and files["val"] and not files["train"] & files["val"]
    held = {f for f in files["train"] | files["val"] if split_value(f) < 0.05}
    assert files["val"] == (held or {min(files["train"] | files["val"], key=split_value)})

    data = SFTPyStdlib(seq_len=256, cache_dir=str(tmp_path / "cache"), root=str(root))
    assert data.stats()["num_examples"] == 10 and data.stats()["num_dropped"] == 0
    built = len(calls)
    again = SFTPyStdlib(seq_len=256, cache_dir=str(tmp_path / "cache"), root=str(root))
    again.stats()
    assert len(calls) == built and again.set_dir == out  # reused, not rebuilt
    (root / "m0.py").write_text('def h(x):\n    """Changed."""\n    return -x\n')
    assert pystdlib_sft(tmp_path / "cache", root=root) != out and len(calls) > built
    limited = SFTPyStdlib(seq_len=256, cache_dir=str(tmp_path / "cache"), root=str(root), max_examples=2)
    assert limited.stats()["num_train_examples"] == 2


def test_stdlib_check_uses_the_cache_and_finds_a_seq_len_that_drops_everything(tmp_path, monkeypatch):
    root = fake_stdlib(tmp_path / "lib")
    pystdlib_sft(tmp_path / "cache", root=root)
    calls = []
    real = sft_stdlib.function_pairs
    monkeypatch.setattr(sft_stdlib, "function_pairs", lambda *a: calls.append(1) or real(*a))
    SFTPyStdlib(seq_len=256, cache_dir=str(tmp_path / "cache"), root=str(root)).check()
    assert not calls  # the cached set is read, not rebuilt
    with pytest.raises(DataError, match=r"the stdlib SFT set \(.*train\.jsonl\): all \d+ train examples were dropped"):
        SFTPyStdlib(seq_len=8, cache_dir=str(tmp_path / "cache"), root=str(root)).check()


def test_stdlib_check_names_the_key(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"^data\.cache_dir=.* is not a directory"):
        SFTPyStdlib(seq_len=32, cache_dir=str(tmp_path / "file")).check()
    with pytest.raises(DataError, match=r"^data\.root=.* is not a directory"):
        SFTPyStdlib(seq_len=32, cache_dir=str(tmp_path), root=str(tmp_path / "nope")).check()


@pytest.fixture(scope="session")
def real_stdlib_set(tmp_path_factory):
    """The real stdlib SFT set, built once per session (about 2 s)."""
    return pystdlib_sft(tmp_path_factory.mktemp("sft-cache"))


def test_real_stdlib_set(real_stdlib_set):
    meta = json.loads((real_stdlib_set / "meta.json").read_text())
    assert meta["num_train_pairs"] > 1000 and meta["num_val_pairs"] > 10
    data = SFTPyStdlib(seq_len=512, cache_dir=str(real_stdlib_set.parent), packing=True)
    stats = data.stats()
    assert stats["num_examples"] + stats["num_dropped"] == meta["num_train_pairs"] + meta["num_val_pairs"]
    assert 0.2 < stats["completion_ratio"] < 0.9
    x, y = next(data.train_sampler(batch_size=2, seed=0))
    assert x.shape == (2, 512) and (y != X).any()
    first = json.loads(next(open(real_stdlib_set / "train.jsonl")))
    assert first["prompt"].lstrip().startswith(("def ", "async def ", "@")) and first["completion"].strip()
    assert np.all(np.asarray(data.examples()[0].tokens) < 264)


# document masking of packed rows


def example_losses(stage, model, batches):
    """Each example's mean cross-entropy over its labelled tokens, in row order (an example ends in EOT)."""
    from exp.model.layers import document_ids

    out = []
    for x, y in batches:
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(stage.logits(model, x).transpose(1, 2), y, reduction="none")
        docs = document_ids(x, EOT)
        for row in range(len(x)):
            for d in docs[row].unique():
                where = (docs[row] == d) & (y[row] != X)
                if where.any():
                    out.append(ce[row][where].mean().item())
    return out


def test_packed_examples_lose_as_each_alone_with_the_document_mask(tmp_path):
    """data.packing=true turns the document mask on by default: the loss of each example in a packed row equals its
    loss alone in its own row (1e-5); with the mask off it does not."""
    from hydra.utils import instantiate

    from exp.config import component

    f = write_jsonl(tmp_path / "chat.jsonl", [qa(i, answer_len=3 + 2 * i) for i in range(8)])
    overrides = ["model=gpt_tiny", "model.n_layer=2", "model.d_model=64", "model.seq_len=96", "hardware=cpu"]
    overrides += ["tracking=none", "stage=sft", "data=sft_jsonl", f"data.path={f}", f"data.val_path={f}"]
    cfg = compose_train(*overrides, "data.packing=true", run_dir=tmp_path / "run")
    stage = validate(cfg).stage
    assert stage.document_token == EOT  # packing switched the mask on, and the stage passes the ids on
    torch.manual_seed(0)
    model = instantiate(component(cfg, "model")).eval()
    packed = instantiate(cfg.data).val_batches(batch_size=2, num_batches=4)
    assert (packed[0][0] == EOT).sum(1).max() >= 3  # rows do hold several examples
    alone = SFTJsonl(str(f), seq_len=96, val_path=str(f)).val_batches(batch_size=8, num_batches=1)

    each = example_losses(stage, model, alone)
    assert len(each) == 8
    assert example_losses(stage, model, packed) == pytest.approx(each, abs=1e-5)
    stage.document_token = None  # the mask off: later examples in a row see the earlier ones
    assert example_losses(stage, model, packed) != pytest.approx(each, abs=1e-3)


def test_document_mask_is_refused_for_a_model_that_cannot_take_it(tmp_path):
    from exp.errors import ConfigError

    f = write_jsonl(tmp_path / "chat.jsonl", [qa(i) for i in range(4)])
    overrides = ["hardware=cpu", "tracking=none", "data=sft_jsonl", f"data.path={f}", "data.packing=true"]
    overrides += ["model=custom", "model._target_=tests.unit.test_sft_data.NoDocuments"]
    cfg = compose_train(*overrides, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^data\.document_mask=true but model NoDocuments\.forward takes no doc_ids"):
        validate(cfg)
    cfg = compose_train(*overrides, "data.document_mask=false", run_dir=tmp_path / "run")
    assert validate(cfg).stage.document_token is None  # packed, attending across examples, as asked


class NoDocuments(torch.nn.Module):
    """A language model whose forward takes token ids only."""

    def __init__(self, vocab_size: int, seq_len: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)

    def forward(self, idx):
        return self.head(self.emb(idx))
