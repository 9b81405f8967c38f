"""exp.data.prepare --tokenizer bpe|PATH: a byte-level BPE trained on local files, uint16/uint32 token files."""

import hashlib
import json

import numpy as np
import pytest

from exp.data import Memmap
from exp.data.corpus import write_token_files
from exp.data.prepare import main as prepare_main


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory):
    pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("bpe") / "data"
    assert prepare_main([str(corpus), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "512"]) == 0
    return out


def tokens(d, dtype=np.uint16):
    return [np.fromfile(d / f, dtype=dtype) for f in ("train.bin", "val.bin")]


def documents(arr, eot):
    cuts = np.flatnonzero(arr == eot)
    return [arr[a + 1 : b] for a, b in zip([-1, *cuts[:-1]], cuts, strict=True)]


def test_bpe_prepare_writes_tokenizer_meta_and_uint16_tokens_that_decode_back(bpe_dir, corpus):
    from tokenizers import Tokenizer

    meta = json.loads((bpe_dir / "meta.json").read_text())
    raw = (bpe_dir / "tokenizer.json").read_bytes()
    tok = meta["tokenizer"]
    assert tok["kind"] == "bpe" and tok["vocab_size"] == meta["vocab_size"] == 512
    assert tok["special_tokens"]["<|endoftext|>"] == 0 and len(tok["special_tokens"]) == 8
    assert tok["fingerprint"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert meta["dtype"] == "uint16" and meta["num_documents"] == len(list(corpus.iterdir()))
    train, val = tokens(bpe_dir)
    assert len(train) == meta["num_train_tokens"] and len(val) == meta["num_val_tokens"]
    assert max(train.max(), val.max()) == meta["max_token_id"] < 512
    assert train.max() > 263  # merges are in use: not bytes in disguise
    loaded = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    texts = {p.read_text() for p in corpus.iterdir()}
    docs = documents(train, 0) + documents(val, 0)
    assert len(docs) == len(texts)  # the literal "<|endoftext|>" in specials.txt did not split it
    assert {loaded.decode(d.tolist(), skip_special_tokens=False) for d in docs} == texts


def test_tokenizer_path_gives_the_same_token_files(bpe_dir, corpus, tmp_path):
    for source in (bpe_dir / "tokenizer.json", bpe_dir):  # the file, or a folder holding tokenizer.json
        out = tmp_path / source.name
        assert prepare_main([str(corpus), "--out", str(out), "--tokenizer", str(source)]) == 0
        for a, b in zip(tokens(bpe_dir), tokens(out), strict=True):
            np.testing.assert_array_equal(a, b)
        meta, ref = (json.loads((d / "meta.json").read_text()) for d in (out, bpe_dir))
        assert meta["tokenizer"] == {**ref["tokenizer"], "kind": "file"}
        assert (out / "tokenizer.json").read_bytes() == (bpe_dir / "tokenizer.json").read_bytes()


def test_vocab_over_65536_writes_uint32_that_memmap_reads(bpe_dir, corpus, tmp_path):
    from tokenizers import Tokenizer

    big = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    big.add_special_tokens([f"<|extra_{i}|>" for i in range(65536 - 512 + 8)])
    big.save(str(tmp_path / "big.json"))
    out = tmp_path / "big"
    assert prepare_main([str(corpus), "--out", str(out), "--tokenizer", str(tmp_path / "big.json")]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 65544 == meta["tokenizer"]["vocab_size"]
    for a, b in zip(tokens(bpe_dir), tokens(out, np.uint32), strict=True):  # same ids, wider files
        np.testing.assert_array_equal(a, b)
    data = Memmap(path=str(out), seq_len=16, vocab_size=65544)  # data.dtype left at its default, uint16
    train, val = data.arrays()
    assert data.dtype == np.uint32 and data.describe()["dtype"] == "uint32"
    np.testing.assert_array_equal(train, tokens(bpe_dir)[0])


def test_writer_picks_uint32_past_65536_ids_and_keeps_them(tmp_path):
    docs = [("a", np.array([70_000, 5, 65_536] * 40)), ("b", np.arange(60_000, 60_200))]
    meta = write_token_files(docs, tmp_path / "d", 0.5, vocab_size=70_001, eot=70_000)
    assert meta["dtype"] == "uint32" and meta["max_token_id"] == 70_000
    data = Memmap(path=str(tmp_path / "d"), seq_len=8, vocab_size=70_001)
    everything = np.concatenate(data.arrays())
    assert sorted(everything.tolist()) == sorted([70_000, 5, 65_536] * 40 + list(range(60_000, 60_200)) + [70_000] * 2)
    with pytest.raises(Exception, match="does not fit data.dtype=uint16"):  # raw files: data.dtype still decides
        Memmap(str(tmp_path / "d" / "train.bin"), 8, 70_001, val_path=str(tmp_path / "d" / "val.bin")).check()


def test_bad_tokenizer_arguments_are_one_line_errors(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare_main([str(corpus), "--out", str(out), "--tokenizer", str(tmp_path / "nope.json")]) == 2
    assert "not bytes, bpe, or an existing tokenizer.json" in capsys.readouterr().err
    assert prepare_main([str(corpus), "--out", str(out), "--vocab-size", "512"]) == 2
    assert "--vocab-size only applies to --tokenizer bpe" in capsys.readouterr().err
    if pytest.importorskip("tokenizers"):
        (tmp_path / "junk.json").write_text("{}")
        assert prepare_main([str(corpus), "--out", str(out), "--tokenizer", str(tmp_path / "junk.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "junk.json: not a tokenizers tokenizer.json" in err[0]
    assert not out.exists()
