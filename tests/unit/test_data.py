"""Data package: tokenizer, corpus writer and cache, window sampler, data targets, prepare CLI."""

import json
import os
import threading

import numpy as np
import pytest
import torch

from exp.data import DataError, Memmap, PyStdlib, corpus
from exp.data.batches import WindowSampler, eval_batches
from exp.data.corpus import pystdlib_corpus, split_value, write_token_files
from exp.data.prepare import main as prepare_main
from exp.data.tokenizer import EOT, VOCAB_SIZE, ByteTokenizer


@pytest.fixture(scope="session")
def stdlib_dir(tmp_path_factory):
    """The real stdlib corpus, built once per test session."""
    return pystdlib_corpus(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def build_count(monkeypatch):
    """Counts the corpus builds (write_token_dir calls) made by pystdlib_corpus."""
    calls = []
    real = corpus.write_token_dir
    monkeypatch.setattr(corpus, "write_token_dir", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def fake_stdlib(root, n=6):
    for i in range(n):
        p = root / ("pkg" if i % 2 else "") / f"m{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"x = {i}\n" * (50 + i))
    for skipped in ("test/t.py", "site-packages/s.py", "pkg/tests/t.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("SKIPPED = 1\n")
    return root


def read_split(d):
    return [np.memmap(d / f, dtype=np.uint16, mode="r") for f in ("train.bin", "val.bin")]


# tokenizer


def test_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    for text in ["hello, world\n", "naïve café — 日本語 🙂"]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode("<|endoftext|>") == list(b"<|endoftext|>")  # not parsed as a special
    assert tok.decode([*b"a", EOT, *b"b", tok.special("assistant")]) == "a<|endoftext|>b<|assistant|>"
    assert tok.special("<|pad|>") == 257 and tok.special("reserved_1") == 263
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a cut-off character decodes with a replacement
    assert VOCAB_SIZE == tok.vocab_size == 264 == max(tok.specials.values()) + 1
    with pytest.raises(KeyError):
        tok.special("bogus")


# write_token_files


def test_write_token_files_exact_layout(tmp_path):
    meta = write_token_files([("a", b"hi"), ("b", [1, 2, 3])], tmp_path / "out", 0.3)
    train, val = read_split(tmp_path / "out")
    docs = {"a": [104, 105, EOT], "b": [1, 2, 3, EOT]}
    # each file holds whole documents; val always gets at least one, train keeps one
    assert sorted([train.tolist(), val.tolist()]) == sorted(docs.values())
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta and meta["num_documents"] == 2 and meta["dtype"] == "uint16"
    assert (tmp_path / "out" / "train.bin").stat().st_size == 2 * meta["num_train_tokens"] == 2 * len(train)
    assert (tmp_path / "out" / "val.bin").stat().st_size == 2 * meta["num_val_tokens"] == 2 * len(val)


def test_write_token_files_split_is_deterministic_and_by_hash(tmp_path):
    docs = [(f"doc{i}", bytes([65 + i % 26]) * 40) for i in range(200)]
    m1 = write_token_files(docs, tmp_path / "a", 0.2, min_val_tokens=0)
    m2 = write_token_files(reversed(docs), tmp_path / "b", 0.2, min_val_tokens=0)
    expected_val = sum(split_value(n) < 0.2 for n, _ in docs)
    # hash-chosen documents, plus a deterministic top-up toward 20% of the tokens; input order is irrelevant
    assert m1["num_val_documents"] == m2["num_val_documents"] >= expected_val > 0
    assert m1["num_val_tokens"] == m2["num_val_tokens"] and m1["sources"] != m2["sources"]
    val_a = sorted(read_split(tmp_path / "a")[1].tolist())
    assert val_a == sorted(read_split(tmp_path / "b")[1].tolist())


def test_write_token_files_tops_val_up_to_min_tokens(tmp_path):
    docs = [(f"d{i}", b"x" * 99) for i in range(50)]  # 100 tokens each with EOT
    meta = write_token_files(docs, tmp_path / "o", 0.01, min_val_tokens=1000)
    assert meta["num_val_tokens"] == 1000 and meta["num_val_documents"] == 10
    assert meta["num_train_tokens"] + meta["num_val_tokens"] == 5000


def test_write_token_files_splits_a_single_document_by_tokens(tmp_path):
    text = bytes(range(32, 127)) * 100  # 9,500 bytes + EOT
    meta = write_token_files([("one.txt", text)], tmp_path / "out", 0.1, min_val_tokens=0)
    train, val = read_split(tmp_path / "out")
    assert train.tolist() + val.tolist() == [*text, EOT]  # the document in order: head to train, tail to val
    assert len(val) == meta["num_val_tokens"] == 951 and len(train) == meta["num_train_tokens"] == 8550
    assert meta["split"] == "tokens" and meta["num_documents"] == 1 and meta["num_val_documents"] == 0
    assert meta["max_token_id"] == EOT and corpus.is_complete(tmp_path / "out")
    # val is topped up to min_val_tokens as with documents, and a one-byte document still gives both files a token
    assert write_token_files([("one.txt", text)], tmp_path / "min", 0.01)["num_val_tokens"] == corpus.MIN_VAL_TOKENS
    tiny = write_token_files([("t", b"x")], tmp_path / "tiny", 0.01)
    assert (tiny["num_train_tokens"], tiny["num_val_tokens"]) == (1, 1)
    many = write_token_files([("a", b"aa"), ("b", [300 - 40, 1])], tmp_path / "many", 0.5)
    assert many["split"] == "documents" and many["max_token_id"] == 260


def test_write_token_files_atomic(tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    stale = tmp_path / f"corpus.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"junk")
    write_token_files([("a", b"aa"), ("b", b"bb")], out, 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    assert corpus.is_complete(out)

    def boom():
        yield "c", b"cc"
        raise RuntimeError("crash mid-build")

    with pytest.raises(RuntimeError):
        write_token_files(boom(), tmp_path / "other", 0.5)
    # the failed build leaves neither an output dir nor its temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    with pytest.raises(ValueError, match="no non-empty documents"):
        write_token_files([("a", b"")], tmp_path / "none", 0.5)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        write_token_files([("a", b"aa"), ("b", b"bb")], tmp_path / "notes", 0.5)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"


# pystdlib_corpus


def test_pystdlib_corpus_real(stdlib_dir):
    meta = json.loads((stdlib_dir / "meta.json").read_text())
    train, val = read_split(stdlib_dir)
    assert len(train) == meta["num_train_tokens"] > 1_000_000
    assert len(val) == meta["num_val_tokens"] >= corpus.MIN_VAL_TOKENS and meta["num_val_documents"] >= 1
    assert int(train.max()) == EOT and train[-1] == EOT and val[-1] == EOT
    assert stdlib_dir.name.startswith("pystdlib-") and len(stdlib_dir.name) == len("pystdlib-") + 16


def test_pystdlib_corpus_builds_once_and_keys_on_sources(tmp_path, build_count):
    root = fake_stdlib(tmp_path / "lib")
    names = [p.relative_to(root).as_posix() for p in corpus.stdlib_sources(root)]
    assert names == sorted(names) and not any("test" in n or "site-packages" in n for n in names)
    cache = tmp_path / "cache"
    d1 = pystdlib_corpus(cache, 0.2, root=root)
    stamp = (d1 / "train.bin").stat().st_mtime_ns
    assert pystdlib_corpus(cache, 0.2, root=root) == d1 and len(build_count) == 1
    assert (d1 / "train.bin").stat().st_mtime_ns == stamp
    assert pystdlib_corpus(cache, 0.3, root=root) != d1 and len(build_count) == 2
    (root / "new.py").write_text("y = 1\n")
    d3 = pystdlib_corpus(cache, 0.2, root=root)
    assert d3 != d1 and len(build_count) == 3
    assert json.loads((d3 / "meta.json").read_text())["num_documents"] == 7
    # an incomplete directory (sizes disagree with meta.json) is rebuilt, not trusted
    with open(d3 / "train.bin", "ab") as f:
        f.write(b"\0\0")
    assert pystdlib_corpus(cache, 0.2, root=root) == d3 and len(build_count) == 4
    assert corpus.is_complete(d3) and not list(cache.glob("*.tmp-*"))


def test_pystdlib_corpus_concurrent_builders(tmp_path, build_count):
    root = fake_stdlib(tmp_path / "lib")
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(pystdlib_corpus(tmp_path / "c", root=root))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # flock is per open file, so threads serialize like processes: one build, all see it
    assert len(build_count) == 1 and len(set(results)) == 1 and corpus.is_complete(results[0])


# WindowSampler and eval_batches


def test_window_sampler_batches_are_real_shifted_slices():
    tokens = np.arange(1000, dtype=np.uint16)  # value == position, so slices are easy to check
    x, y = next(WindowSampler(tokens, seq_len=16, batch_size=8, seed=0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16)) and torch.equal(y, x + 1)
    assert x.min() >= 0 and y.max() <= 999
    # the last window must be reachable: with 17 tokens there is exactly one start
    x, y = next(WindowSampler(tokens[:17], 16, 4, seed=0))
    assert (x[:, 0] == 0).all() and (y[:, -1] == 16).all()


def test_window_sampler_resume_seeds_and_ranks():
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)
    s = WindowSampler(tokens, 32, 8, seed=7)
    next(s), next(s)
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON round trip
    assert state["num_batches"] == 2
    expected = [next(s) for _ in range(2)]
    fresh = WindowSampler(tokens, 32, 8, seed=7)
    fresh.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [next(fresh) for _ in range(2)], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert fresh.num_batches == 4
    a, b = WindowSampler(tokens, 32, 8, seed=7), WindowSampler(tokens, 32, 8, seed=7)
    assert torch.equal(next(a)[0], next(b)[0])
    r0, r1 = WindowSampler(tokens, 32, 8, 7, rank=0, world_size=2), WindowSampler(tokens, 32, 8, 7, 1, 2)
    assert not torch.equal(next(r0)[0], next(r1)[0])
    assert not torch.equal(next(WindowSampler(tokens, 32, 8, seed=8))[0], next(WindowSampler(tokens, 32, 8, 7))[0])
    r1.load_state_dict(state)  # the state is the shared stream's position: any rank of any number takes its share
    assert torch.equal(next(r1)[0], expected[1][0])  # rank 1 of 2 ranks of 8: the second 8 of the next 16 windows
    with pytest.raises(ValueError, match="seed"):
        WindowSampler(tokens, 32, 8, seed=8).load_state_dict(state)


def test_window_sampler_too_short():
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(np.zeros(16, dtype=np.uint16), seq_len=16, batch_size=2, seed=0)


def test_eval_batches_fixed_and_spread():
    tokens = np.arange(10_000, dtype=np.uint16)
    b1, b2 = eval_batches(tokens, 50, 4, 5), eval_batches(tokens, 50, 4, 5)
    assert len(b1) == 5 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(b1, b2, strict=True))
    starts = torch.cat([x[:, 0] for x, _ in b1])
    assert starts[0] == 0 and starts[-1] == 10_000 - 51 and (starts.diff() > 0).all()
    assert torch.equal(b1[0][1], b1[0][0] + 1)
    assert len(eval_batches(tokens[:120], 50, 4, 5)) == 1  # clamped, but one batch
    with pytest.raises(ValueError):
        eval_batches(tokens[:50], 50, 4, 5)


# data targets and the prepare CLI


def make_inputs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha " * 100)
    (folder / "sub" / "b.md").write_text("# beta\n" * 100)
    (folder / "skip.bin").write_bytes(b"\xff" * 10)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i} é", "id": i}) for i in range(20)) + "\n")
    return folder, jsonl


def test_prepare_cli_and_memmap(tmp_path, capsys):
    folder, jsonl = make_inputs(tmp_path)
    out = tmp_path / "prepared"
    assert prepare_main([str(folder), str(jsonl), "--out", str(out), "--val-fraction", "0.1"]) == 0
    assert "22 documents" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    train, val = read_split(out)
    assert (
        meta["num_documents"] == 22
        and len(train) + len(val) == 600 + 700 + sum(len(f"line {i} é".encode()) for i in range(20)) + 22
    )
    assert 255 not in set(train.tolist()) | set(val.tolist())  # skip.bin was not included

    data = Memmap(path=str(out), seq_len=32)
    data.check()
    assert data.describe() == {
        "name": "memmap",
        "seq_len": 32,
        "vocab_size": 264,
        "dtype": "uint16",
        "order": "permutation",
    }
    x, y = next(data.train_sampler(batch_size=4, seed=0))
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert data.describe()["train_tokens"] == len(train) and data.describe()["val_tokens"] == len(val)
    # a train file with an explicit val file works too
    explicit = Memmap(path=str(out / "train.bin"), val_path=str(out / "val.bin"), seq_len=8)
    assert explicit.val_batches(2, 1)[0][0].shape == (2, 8)


def test_prepare_bad_json_line(tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "ok"}\n' * 16 + "{not json\n")
    out = tmp_path / "out"
    assert prepare_main([str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl:17" in err and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "a"}\n{"body": "b"}\n')
    assert prepare_main([str(nofield), "--out", str(out)]) == 2
    assert "nofield.jsonl:2" in capsys.readouterr().err
    assert prepare_main([str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_data_targets_validate(tmp_path):
    with pytest.raises(DataError, match=r"data\.path=.*nowhere"):
        Memmap(path=str(tmp_path / "nowhere"), seq_len=8).check()
    (tmp_path / "train.bin").write_bytes(b"\0" * 3)
    with pytest.raises(DataError, match="data.val_path"):
        Memmap(path=str(tmp_path / "train.bin"), val_path=str(tmp_path / "v.bin"), seq_len=8).check()
    with pytest.raises(DataError, match="data.dtype"):
        Memmap(path=str(tmp_path), seq_len=8, dtype="int8").check()
    with pytest.raises(DataError, match="multiple"):
        Memmap(path=str(tmp_path / "train.bin"), val_path=str(tmp_path / "train.bin"), seq_len=8).check()
    with pytest.raises(ValueError, match="data.seq_len"):
        Memmap(path="x", seq_len=0)
    with pytest.raises(ValueError, match="data.val_fraction"):
        PyStdlib(seq_len=8, val_fraction=0.5)
    # constructors touch nothing on disk
    PyStdlib(seq_len=8, cache_dir=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def write_tokens(path, tokens, dtype=np.uint16):
    np.asarray(tokens, dtype=dtype).tofile(path)
    return path


def test_memmap_check_finds_token_ids_and_short_files(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    write_tokens(d / "train.bin", np.arange(1000) % 264)
    write_tokens(d / "val.bin", [*range(100), 300])
    with pytest.raises(DataError, match=r"^data\.path=.*raw/val\.bin holds token id 300 >= data\.vocab_size=264 "):
        Memmap(path=str(d), seq_len=32).check()
    Memmap(path=str(d), seq_len=32, vocab_size=301).check()
    write_tokens(d / "val.bin", range(20))
    with pytest.raises(
        DataError, match=r"^data\.path=.*raw/val\.bin holds 20 tokens, fewer than one window of data\.seq_len=32"
    ):
        Memmap(path=str(d), seq_len=32).check()
    Memmap(path=str(d), seq_len=19).check()  # 20 tokens are exactly one window of 19 + 1
    write_tokens(tmp_path / "big.bin", [5, 70000, 6] * 20, np.uint32)
    with pytest.raises(DataError, match=r"^data\.path=.*big\.bin holds token id 70000 >= data\.vocab_size=50304"):
        Memmap(str(tmp_path / "big.bin"), 8, 50304, val_path=str(d / "val.bin"), dtype="uint32").check()


def test_memmap_check_trusts_meta_only_while_it_describes_the_files(tmp_path):
    out = tmp_path / "prepared"
    write_token_files([("a", b"a" * 500), ("b", b"b" * 500)], out, 0.5)
    assert json.loads((out / "meta.json").read_text())["max_token_id"] == EOT
    Memmap(path=str(out), seq_len=32).check()
    with open(out / "train.bin", "ab") as f:  # tokens appended after prepare: meta.json no longer matches
        f.write(np.array([400], dtype=np.uint16).tobytes())
    with pytest.raises(DataError, match=r"train\.bin holds token id 400 >= data\.vocab_size=264"):
        Memmap(path=str(out), seq_len=32).check()


def test_memmap_directory_with_val_path_is_named_a_directory(tmp_path):
    write_tokens(tmp_path / "val.bin", range(100))
    with pytest.raises(
        DataError,
        match=r"^data\.path=.* is a directory; with data\.val_path set, data\.path must be the train token file$",
    ):
        Memmap(path=str(tmp_path), val_path=str(tmp_path / "val.bin"), seq_len=8).check()


def test_pystdlib_target(stdlib_dir):
    data = PyStdlib(seq_len=64, cache_dir=str(stdlib_dir.parent))
    train, val = data.files()
    assert train == stdlib_dir / "train.bin" and val == stdlib_dir / "val.bin"
    batches = data.val_batches(batch_size=4, num_batches=3)
    assert len(batches) == 3 and batches[0][0].max() < data.vocab_size
    assert data.describe()["val_tokens"] == len(read_split(stdlib_dir)[1])
