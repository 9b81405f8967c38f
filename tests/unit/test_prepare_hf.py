"""prepare hf:... (Hugging Face datasets written here, never the hub), --streaming, --max-docs, --workers,
the progress bar, an interrupted prepare, and SFT reading the same hf: sources."""

import json

import numpy as np
import pytest

from exp.data import prepare
from exp.data.prepare import main as _prepare_main
from exp.data.tokenizer import EOT

datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

ROWS = [
    {
        "text": f"def f{i}(x):\n    return x * {i}  # caf\u00e9 \u2603 {'<|endoftext|> ' * (i % 3)}\n" * (1 + i % 5),
        "n": i,
    }
    for i in range(40)
]
TEXTS = [r["text"] for r in ROWS]


CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    CACHE["dir"] = str(tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One dataset in every local form hf: reads: name -> the hf: source."""
    d = tmp_path_factory.mktemp("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(d / "single"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(5))}).save_to_disk(str(d / "dict"))
    with open(d / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    ds.to_parquet(str(d / "rows.parquet"))
    for config in ("code", "other"):  # a local folder whose README declares configs, as hub datasets do
        (d / "configs" / config).mkdir(parents=True)
        (d / "configs" / config / "train.jsonl").write_text((d / "rows.jsonl").read_text())
    (d / "configs" / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(f"- config_name: {c}\n  data_files: {c}/*.jsonl\n" for c in ("code", "other"))
        + "---\n"
    )
    return {
        "save_to_disk": f"hf:{d / 'single'}",
        "DatasetDict": f"hf:{d / 'dict'}",
        "json": f"hf:json:{d / '*.jsonl'}",
        "parquet": f"hf:parquet:{d / 'rows.parquet'}",
        "config": f"hf:{d / 'configs'}:code",
    }


@pytest.fixture(scope="module")
def tokenizer(sources, tmp_path_factory):
    """A BPE trained by prepare itself on an hf: source (the training pass streams it too)."""
    out = tmp_path_factory.mktemp("bpe") / "data"
    args = [sources["json"], "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "400", "--quiet"]
    assert prepare_main(args) == 0
    return out / "tokenizer.json"


def prepare_main(args):
    """prepare's CLI, with load_dataset's Arrow files in this module's folder rather than the home folder."""
    return _prepare_main([*args, "--cache-dir", CACHE["dir"]])


def documents(folder, dtype=np.uint16, eot=EOT):
    """Token documents of train.bin then val.bin, split at the end-of-text id."""
    out = []
    for f in ("train.bin", "val.bin"):
        arr = np.fromfile(folder / f, dtype=dtype)
        cuts = np.flatnonzero(arr == eot)
        out += [arr[a + 1 : b] for a, b in zip([-1, *cuts[:-1]], cuts, strict=True)]
    return out


def same_files(a, b):
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json"))


@pytest.mark.parametrize("form", ["save_to_disk", "DatasetDict", "json", "parquet", "config"])
def test_every_local_form_gives_the_rows_as_documents(sources, form, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare_main([sources[form], "--out", str(out), "--val-fraction", "0.1"]) == 0
    assert capsys.readouterr().out.startswith("prepared 40 documents")
    got = sorted(bytes(d.astype(np.uint8)).decode("utf-8") for d in documents(out))
    assert got == sorted(TEXTS)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_documents"] == 40 and meta["tokenizer"]["kind"] == "bytes"


def test_streaming_and_max_docs(sources, tmp_path):
    src = sources["json"]
    full, streamed = tmp_path / "full", tmp_path / "streamed"
    assert prepare_main([src, "--out", str(full), "--quiet"]) == 0
    assert prepare_main([src, "--out", str(streamed), "--streaming", "--quiet"]) == 0
    assert same_files(full, streamed)  # same rows, same names, same split
    for flags in ([], ["--streaming"]):
        out = tmp_path / f"first{len(flags)}"
        assert prepare_main([src, "--out", str(out), "--max-docs", "7", *flags]) == 0
        assert json.loads((out / "meta.json").read_text())["num_documents"] == 7
        assert sorted(bytes(d.astype(np.uint8)).decode() for d in documents(out)) == sorted(TEXTS[:7])
    assert same_files(tmp_path / "first0", tmp_path / "first1")
    # --max-docs counts across inputs, files included; --split picks the DatasetDict's split
    for i in range(3):
        (tmp_path / "files" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "files" / f"{i}.txt").write_text(f"plain file {i}")
    out = tmp_path / "mixed"
    args = [sources["DatasetDict"], "--split", "validation", str(tmp_path / "files"), "--out", str(out)]
    assert prepare_main([*args, "--max-docs", "7"]) == 0
    got = sorted(bytes(d.astype(np.uint8)).decode() for d in documents(out))
    assert got == sorted([*TEXTS[:5], "plain file 0", "plain file 1"])


def test_bpe_workers_give_identical_files_that_decode_back(sources, tokenizer, tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    monkeypatch.setattr(prepare, "BATCH_DOCS", 3)  # many batches through the encoding thread
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        args = [sources["parquet"], "--out", str(outs[workers]), "--tokenizer", str(tokenizer), "--quiet"]
        assert prepare_main([*args, "--workers", str(workers)]) == 0
    assert same_files(outs[1], outs[2])
    tok = Tokenizer.from_file(str(tokenizer))
    eot = tok.token_to_id("<|endoftext|>")
    got = sorted(tok.decode(d.tolist(), skip_special_tokens=False) for d in documents(outs[2], eot=eot))
    assert got == sorted(TEXTS)  # "<|endoftext|>" inside a text stays text, not the separator


@pytest.mark.parametrize(
    "form, flags, needle",
    [
        ("DatasetDict", ["--split", "test"], "no split 'test' (it has: train, validation)"),
        ("json", ["--split", "test"], "no split 'test'"),
        ("json", ["--split", "test", "--streaming"], "no split 'test'"),
        ("config", [], None),  # replaced by a config that does not exist, below
        ("save_to_disk", ["--text-field", "body"], "no field 'body' (it has: text, n); set --text-field"),
        ("json", ["--text-field", "body", "--streaming"], "no field 'body'"),
        ("parquet", ["--text-field", "n"], "[train]:0: field 'n' is int, not a string"),
    ],
)
def test_bad_hf_inputs_are_one_line_and_write_nothing(sources, form, flags, needle, tmp_path, capsys):
    src = sources[form]
    if needle is None:
        src, needle = src.rsplit(":", 1)[0] + ":nope", "no config 'nope'"
    out = tmp_path / "out"
    assert prepare_main([src, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src}") and needle in err[0], err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_bad_hf_arguments(sources, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        ([f"hf:json:{tmp_path / '*.missing'}"], "no file matches"),
        (["hf:"], "name a dataset"),
        (["hf:parquet:"], "name the files"),
        ([sources["config"].rsplit(":", 1)[0]], "Config name is missing. Please pick one among the available configs"),
        ([str(tmp_path), "--streaming"], "--streaming only applies to hf: inputs"),
        ([sources["json"], "--max-docs", "0"], "--max-docs must be at least 1"),
        ([sources["json"], "--workers", "0"], "--workers must be at least 1"),
    ]
    for args, needle in cases:
        assert prepare_main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (args, err)
    assert not out.exists()


def test_sft_reads_the_same_hf_sources(tmp_path):
    from exp.data.sft import SFTJsonl

    chats = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(6)
    ]
    folder = tmp_path / "chat"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(chats), "validation": datasets.Dataset.from_list(chats[:2])}
    ).save_to_disk(str(folder))
    data = SFTJsonl(f"hf:{folder}", seq_len=32, val_split="validation")
    data.check_sources()
    train, val = data.conversations()
    assert len(train) == 6 and len(val) == 2 and train[0][-1]["content"] == "a0"
    with pytest.raises(Exception, match=r"^data\.path=hf:.*chat: no split 'test'"):
        SFTJsonl(f"hf:{folder}", seq_len=32, split="test").conversations()


def test_writer_memory_is_flat_in_corpus_size(tmp_path, monkeypatch):
    import tracemalloc

    from exp.data import corpus

    monkeypatch.setattr(corpus, "INDEX_FLUSH", 512)  # the train index goes to disk every 512 documents

    def peak(num_docs):
        docs = ((f"doc{i}", b"x" * (50 + i % 200)) for i in range(num_docs))
        tracemalloc.start()
        meta = corpus.write_token_files(docs, tmp_path / f"n{num_docs}", 0.01)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert meta["num_documents"] == num_docs and meta["num_val_documents"] > 0
        return top

    small, large = peak(5_000), peak(40_000)
    assert large < 1.5 * small + 100_000, (small, large)  # 8x the documents, not 8x the memory
