"""data=mixture: draws by weight, the schedule of weights, per-source validation and counts, bad input; the layouts
(N ranks x B = one process of N*B, resume at any ranks) are in test_sampler_layouts."""

import json

import numpy as np
import pytest
import torch

from exp.config import validate
from exp.data import DataError, Mixture
from exp.data.mixture import MixtureSampler, ValSets
from exp.errors import ConfigError
from exp.loop import evaluate

from ..conftest import TINY, compose_train

# two sources told apart by their ids: a's are 0..99, b's 100..199
A = np.random.default_rng(0).integers(0, 100, 5000).astype(np.uint16)
B = np.random.default_rng(1).integers(100, 200, 3000).astype(np.uint16)


def source_of(x: torch.Tensor) -> list[str]:
    return ["a" if row.max() < 100 else "b" for row in x]


def sampler(weights=None, phases=None, order="permutation", batch=50, rank=0, world=1, seed=3) -> MixtureSampler:
    phases = phases or [(0, weights or {"a": 0.25, "b": 0.75})]
    return MixtureSampler({"a": A, "b": B}, phases, 16, order, batch, seed, rank, world)


@pytest.mark.parametrize("order", ["permutation", "random"])
def test_a_quarter_of_4000_windows_come_from_the_source_weighted_a_quarter(order):
    s = sampler(order=order)
    drawn = [src for _ in range(80) for src in source_of(next(s)[0])]
    assert len(drawn) == 4000
    assert abs(drawn.count("a") / 4000 - 0.25) <= 0.02
    assert s.counts == {"a": drawn.count("a"), "b": drawn.count("b")}
    assert s.metrics()["data/tokens/a"] == 16 * drawn.count("a") and s.metrics()["data/weight/b"] == 0.75


def test_each_source_goes_through_its_windows_once_per_epoch():
    """permutation: a source's first num_windows samples are each of its windows once (rows are whole windows)."""
    s = sampler({"a": 0.5, "b": 0.5}, batch=40)
    rows = {"a": [], "b": []}
    for _ in range(20):
        x, y = next(s)
        for src, xi, yi in zip(source_of(x), x.tolist(), y.tolist(), strict=True):
            rows[src].append(tuple(xi + yi[-1:]))
    num_a = (len(A) - 1) // 16
    assert len(rows["a"]) >= num_a
    windows = sorted(tuple(A[w * 16 : w * 16 + 17].tolist()) for w in range(num_a))
    assert sorted(rows["a"][:num_a]) == windows


def test_the_schedule_switches_the_weights_at_its_sample():
    s = sampler(phases=[(0, {"a": 0.9, "b": 0.1}), (2000, {"a": 0.1, "b": 0.9})])
    before = [src for _ in range(40) for src in source_of(next(s)[0])]
    assert s.metrics()["data/weight/a"] == pytest.approx(0.1)  # position 2000: the second phase is in force
    after = [src for _ in range(40) for src in source_of(next(s)[0])]
    assert before.count("a") / 2000 == pytest.approx(0.9, abs=0.03)
    assert after.count("a") / 2000 == pytest.approx(0.1, abs=0.03)


def test_a_resumed_sampler_draws_what_the_uninterrupted_one_draws_across_a_phase_change():
    phases = [(0, {"a": 0.5, "b": 0.5}), (330, {"a": 1.0, "b": 0.0})]
    straight = sampler(phases=phases, batch=30)
    batches = [next(straight) for _ in range(20)]
    first = sampler(phases=phases, batch=30)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
    resumed = sampler(phases=phases, batch=30)
    resumed.load_state_dict(state)
    for want in batches[7:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = MixtureSampler({"a": A, "c": B}, [(0, {"a": 1.0, "c": 1.0})], 16, "permutation", 30, 3)
    with pytest.raises(ValueError, match="a mixture of a, b; this one mixes a, c"):
        other.load_state_dict(state)


def test_weights_are_normalised_and_recorded(tmp_path):
    a, b = write_folder(tmp_path / "a", A), write_folder(tmp_path / "b", B)
    data = Mixture({"a": {"path": str(a), "weight": 1}, "b": {"path": str(b), "weight": 3}}, seq_len=16)
    data.check()
    assert data.weights == {"a": 0.25, "b": 0.75} and data.describe()["weights"] == {"a": 0.25, "b": 0.75}
    schedule = [{"at": 0.5, "weights": {"a": 3}}]  # b keeps its weight (3): a and b even from half-way
    data = Mixture({"a": {"path": str(a), "weight": 1}, "b": {"path": str(b), "weight": 3}}, 16, schedule=schedule)
    data.total_samples = 1000
    assert data.phases() == [(0, {"a": 0.25, "b": 0.75}), (500, {"a": 0.5, "b": 0.5})]


def test_validation_is_per_source_and_the_mixture_loss_is_their_weighted_mean(tmp_path):
    from exp.hardware import Runtime
    from exp.model import GPT
    from exp.stages import Pretrain

    a, b = write_folder(tmp_path / "a", A), write_folder(tmp_path / "b", B)
    data = Mixture({"a": {"path": str(a), "weight": 1}, "b": {"path": str(b), "weight": 3}}, seq_len=16)
    data.check()
    sets = data.val_batches(batch_size=4, num_batches=2)
    assert isinstance(sets, ValSets) and list(sets.sets) == ["a", "b"]
    assert all(int(x.max()) < 100 for x, _ in sets.sets["a"]) and all(int(x.min()) >= 100 for x, _ in sets.sets["b"])
    torch.manual_seed(0)
    model = GPT(vocab_size=264, seq_len=16, n_layer=1, n_head=2, d_model=32)
    stage = Pretrain(name="pretrain", num_steps=1, batch_size_per_gpu=4, learning_rate=1e-3)
    rt = Runtime(torch.device("cpu"), torch.float32)
    out = evaluate(stage, model, sets, rt)
    each = {name: evaluate(stage, model, b, rt)["loss"] for name, b in sets.sets.items()}
    assert out["loss/a"] == pytest.approx(each["a"]) and out["loss/b"] == pytest.approx(each["b"])
    assert out["loss"] == pytest.approx(0.25 * each["a"] + 0.75 * each["b"])


def write_folder(path, tokens):
    """A prepared folder (train.bin, val.bin, meta.json) of byte tokens."""
    path.mkdir(parents=True)
    tokens.tofile(path / "train.bin")
    tokens[:1000].tofile(path / "val.bin")
    meta = {"vocab_size": 264, "dtype": "uint16", "num_train_tokens": len(tokens), "num_val_tokens": 1000}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize(
    "sources, extra, line",
    [
        ({"a": "A", "b": "/nowhere/b"}, [], r"^data\.sources\.b\.path=/nowhere/b does not exist$"),
        ({"a": "A"}, ["+data.sources.a.weight=-1"], r"^data\.sources\.a\.weight=-1 must be a number >= 0$"),
        (
            {"a": "A", "b": "B"},
            ["+data.sources.a.weight=0", "+data.sources.b.weight=0"],
            r"^data\.sources: the weights are all zero",
        ),
        ({"a": "A", "b": "B"}, ["data.schedule=[{at: 0.5, weights: {c: 1}}]"], r"names c, not in data\.sources"),
        ({"a": "A", "b": "B"}, ["data.schedule=[{at: 1.5, weights: {a: 1}}]"], r"data\.schedule\[0\]\.at=1\.5"),
        ({}, [], r"^data\.sources: none given"),
        ({"a": "A"}, ["+data.sources.a.wieght=1"], r"^data\.sources\.a: unknown keys wieght "),
    ],
)
def test_bad_mixtures_are_one_line_config_errors(tmp_path, sources, extra, line):
    folders = {"A": write_folder(tmp_path / "fa", A), "B": write_folder(tmp_path / "fb", B)}
    paths = [f"+data.sources.{n}.path={folders.get(p, p)}" for n, p in sources.items()]
    cfg = compose_train(*TINY, "data=mixture", "~data.sources.code", *paths, *extra, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=line):
        validate(cfg)
    assert not (tmp_path / "run").exists()


def test_sources_of_two_tokenizers_are_refused_naming_both(tmp_path):
    pytest.importorskip("tokenizers")
    from exp.data.prepare import main as prepare

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    assert (
        prepare([str(text), "--out", str(tmp_path / "bpe"), "--tokenizer", "bpe", "--vocab-size", "300", "--quiet"])
        == 0
    )
    bytes_folder = write_folder(tmp_path / "bytes", A)
    sources = {"bytes": {"path": str(bytes_folder)}, "bpe": {"path": str(tmp_path / "bpe")}}
    with pytest.raises(
        DataError,
        match=r"data\.sources\.bpe is tokenized with a tokenizer of \d+ tokens .*, "
        r"data\.sources\.bytes with bytes: a mixture's sources must share one tokenizer",
    ):
        Mixture(sources, seq_len=16, vocab_size=512).check()


def test_a_raw_text_source_is_prepared_once_into_the_cache(tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("\n".join(f"line {i} of some prose" for i in range(2000)))
    data = Mixture({"prose": {"path": str(text)}}, 16, cache_dir=str(tmp_path / "cache"))
    data.check()
    folder = data.parts()["prose"].path
    assert str(tmp_path / "cache") in folder and (tmp_path / "cache").is_dir()
    again = Mixture({"prose": {"path": str(text)}}, 16, cache_dir=str(tmp_path / "cache"))
    again.check()
    assert again.parts()["prose"].path == folder  # found in the cache, not prepared again
    train, _ = data.source_arrays()["prose"]
    assert bytes(np.asarray(train[:6]).astype(np.uint8)) == b"line 0"
