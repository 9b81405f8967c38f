"""The end-of-run sample's prompt comes from the data's own validation text: "def " for Python, the first words of a
validation document for prose."""

import logging

import exp.run
from exp.data.corpus import write_token_files
from exp.data.tokenizer import ByteTokenizer
from exp.data.tokens import Memmap, PyStdlib
from exp.sampling import data_prompt, prompt_from_text

from ..conftest import TINY, compose_train

PROSE = [
    ("a", "It was the best of times, it was the worst of times.\nIt was the age of wisdom.\n" * 30),
    ("b", "Call me Ishmael. Some years ago, never mind how long precisely.\n" * 30),
    ("c", "\n\n  The quick brown fox jumps over the lazy dog, again and again.\n" * 30),
]


def prose_dir(path, docs=PROSE):
    tok = ByteTokenizer()
    write_token_files(((name, tok.encode(text)) for name, text in docs), path, 0.34, min_val_tokens=64)
    return path


def test_the_rule_on_text():
    assert prompt_from_text("import os\n\n\nclass A:\n    def run(self):\n", "import os\n") == "def "
    prose = "\n\nCall me Ishmael. Some years ago, never mind"
    assert prompt_from_text(prose, prose) == "Call me Ishmael. Some"
    assert prompt_from_text("of times.\nIt was the age", "of times.\nIt was the age", starts_at_document=False) == (
        "It was the age"
    )
    assert prompt_from_text("", "") == ""


def test_prose_data_gets_the_first_words_of_a_validation_document(tmp_path):
    data = Memmap(path=str(prose_dir(tmp_path / "prose")), seq_len=32, vocab_size=264)
    data.check()
    prompt = data_prompt(data, data.tokenizer())
    first_lines = {"It was the best", "Call me Ishmael. Some", "The quick brown fox"}
    assert prompt in first_lines and not prompt.startswith("def")


def test_the_stdlib_corpus_keeps_def():
    data = PyStdlib(seq_len=32, vocab_size=264)
    data.check()
    assert data_prompt(data, data.tokenizer()) == "def "


def test_data_without_validation_tokens_gets_no_prompt():
    assert data_prompt(object(), ByteTokenizer()) == "" and data_prompt(object(), None) == ""


def test_a_run_on_prose_samples_from_its_own_prompt(tmp_path, caplog):
    data = ["data=memmap", f"data.path={prose_dir(tmp_path / 'prose')}"]
    with caplog.at_level(logging.INFO, logger="exp"):
        exp.run.train(compose_train(*TINY, *data, run_dir=tmp_path / "run"))
    sample = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("sample:"))
    assert sample.split("\n", 1)[1].startswith(("It was the best", "Call me Ishmael. Some", "The quick brown fox"))
