"""A BPE tokenizer through a model's life: the data folder sets the vocabulary, checkpoints and exports carry
tokenizer.json, the sample / exp.generate / SFT / chat use it, and weights of another tokenizer are refused."""

import json
import shutil

import pytest

pytest.importorskip("tokenizers")

import exp.run  # noqa: E402
from exp.checkpoint import saved_tokenizer  # noqa: E402
from exp.config import validate  # noqa: E402
from exp.data.bpe import HFTokenizer, train_bpe  # noqa: E402
from exp.data.prepare import main as prepare_main  # noqa: E402
from exp.data.sft import encode_chat  # noqa: E402
from exp.errors import ConfigError, ResumeError  # noqa: E402
from exp.export import main as export_main  # noqa: E402
from exp.generate import main as generate_main  # noqa: E402

from ..conftest import TINY, compose_train  # noqa: E402

PRETRAIN = [*TINY, "stage.num_steps=6", "checkpoint.every_n_steps=3", "sample.max_new_tokens=12"]


def prepare(corpus, out, vocab_size):
    assert prepare_main([str(corpus), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", str(vocab_size)]) == 0
    return out


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory):
    return prepare(corpus, tmp_path_factory.mktemp("bpe") / "data", 500)


@pytest.fixture(scope="module")
def other_data(corpus, tmp_path_factory):
    return prepare(corpus, tmp_path_factory.mktemp("bpe2") / "data", 450)


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pre") / "run"
    tracked = [o for o in PRETRAIN if o != "tracking=none"] + [f"tracking.uri=sqlite:///{run_dir.parent}/mlflow.db"]
    exp.run.train(compose_train(*tracked, "data=memmap", f"data.path={data_dir}", run_dir=run_dir))
    return run_dir


def test_the_data_folder_sets_the_vocabulary_and_the_model_pads_it(data_dir, tmp_path):
    cfg = compose_train(*TINY, "data=memmap", f"data.path={data_dir}", run_dir=tmp_path / "run")
    validate(cfg)
    assert cfg.data.vocab_size == 500 and cfg.model.vocab_size == 512  # no data.vocab_size given


def test_checkpoints_carry_the_tokenizer_and_the_sample_uses_it(pretrained, data_dir):
    tokenizer_json = (data_dir / "tokenizer.json").read_bytes()
    meta = json.loads((data_dir / "meta.json").read_text())
    checkpoints = sorted((pretrained / "checkpoints").iterdir())
    assert {"step_00000003", "step_00000006"} <= {c.name for c in checkpoints}
    for c in checkpoints:
        assert (c / "tokenizer.json").read_bytes() == tokenizer_json
        assert "tokenizer.json" in json.loads((c / "manifest.json").read_text())["files"]
        state = json.loads((c / "trainer_state.json").read_text())
        assert state["tokenizer"]["fingerprint"] == meta["tokenizer"]["fingerprint"]
    summary = json.loads((pretrained / "summary.json").read_text())
    assert isinstance(summary["sample"], str) and summary["sample"]  # decoded by the BPE: no byte fallback
    assert saved_tokenizer(pretrained).fingerprint == meta["tokenizer"]["fingerprint"]


def test_the_runs_model_artifact_in_mlflow_carries_its_tokenizer(pretrained, data_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    marker = json.loads((pretrained / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=marker["tracking_uri"])
    names = {a.path for a in client.list_artifacts(marker["run_id"], "model")}
    assert names == {"model/model.safetensors", "model/config.yaml", "model/tokenizer.json"}
    got = client.download_artifacts(marker["run_id"], "model/tokenizer.json", str(tmp_path))
    assert open(got, "rb").read() == (data_dir / "tokenizer.json").read_bytes()


def test_resume_with_more_steps_keeps_the_tokenizer(pretrained, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(pretrained, run_dir)
    more = compose_train(
        *PRETRAIN,
        "data=memmap",
        f"data.path={data_dir}",
        "stage.num_steps=8",
        "resume.allow_config_change=true",
        run_dir=run_dir,
    )
    exp.run.train(more)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 8 and summary["status"] == "FINISHED"
    assert (run_dir / "checkpoints" / "step_00000008" / "tokenizer.json").is_file()


def test_generate_and_export_decode_with_the_runs_tokenizer(pretrained, tmp_path, capsys):
    assert generate_main([str(pretrained), "--prompt", "import json", "--max-new-tokens", "10", "--seed", "1"]) == 0
    from_run = capsys.readouterr().out
    assert from_run.startswith("import json") and len(from_run) > len("import json\n")
    assert export_main([str(pretrained), str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == (
        pretrained / "checkpoints" / "step_00000006" / "tokenizer.json"
    ).read_bytes()
    assert (
        generate_main([str(tmp_path / "export"), "--prompt", "import json", "--max-new-tokens", "10", "--seed", "1"])
        == 0
    )
    assert capsys.readouterr().out == from_run  # the same weights and tokenizer: the same text


def test_weights_of_another_tokenizer_are_refused(pretrained, other_data, data_dir, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^stage\.init_from=.*was trained with a tokenizer of 500 tokens .* "
        r"uses a tokenizer of 450 tokens",
    ):
        validate(
            compose_train(
                *TINY, "data=memmap", f"data.path={other_data}", f"stage.init_from={pretrained}", run_dir=tmp_path / "a"
            )
        )
    with pytest.raises(ConfigError, match=r"^stage\.teacher\.path=.*byte tokens"):
        validate(compose_train(*TINY, "stage=distill", f"stage.teacher.path={pretrained}", run_dir=tmp_path / "b"))
    run_dir = tmp_path / "c"
    shutil.copytree(pretrained, run_dir)
    cfg = compose_train(
        *PRETRAIN, "data=memmap", f"data.path={other_data}", "resume.allow_config_change=true", run_dir=run_dir
    )
    with pytest.raises(ResumeError, match="was trained with a tokenizer of 500 tokens"):
        exp.run.train(cfg)
    assert sorted((run_dir / "checkpoints").iterdir()) == [
        run_dir / "checkpoints" / c.name for c in sorted((pretrained / "checkpoints").iterdir())
    ]
    assert validate(
        compose_train(
            *TINY, "data=memmap", f"data.path={data_dir}", f"stage.init_from={pretrained}", run_dir=tmp_path / "d"
        )
    )


def test_a_missing_tokenizer_json_is_one_line(pretrained, tmp_path, capsys):
    export = tmp_path / "export"
    assert export_main([str(pretrained), str(export)]) == 0
    (export / "tokenizer.json").unlink()
    capsys.readouterr()
    assert generate_main([str(export), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json is missing" in err
    with pytest.raises(ConfigError, match=r"^stage\.init_from=.*tokenizer\.json is missing"):
        validate(compose_train(*TINY, f"stage.init_from={export}", run_dir=tmp_path / "run"))


def test_chat_tokens_are_added_to_a_tokenizer_without_them(tmp_path):
    base = HFTokenizer(train_bpe(["hello world " * 50], 300, special_tokens=("<|endoftext|>",)))
    chat = base.with_chat_tokens()
    assert chat.vocab_size == base.vocab_size + 4
    ids, labels = encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], chat)
    assert ids[0] == chat.special("user") and ids[-1] == chat.EOT
    assert chat.decode(ids) == "<|user|>hi<|end|><|assistant|>hello<|end|><|endoftext|>"
    assert [i for i, lab in zip(ids, labels, strict=True) if lab != -100] == [
        *chat.encode("hello"),
        chat.special("end"),
    ]


def test_sft_on_bpe_then_chat_stops_at_the_end_of_the_turn(pretrained, data_dir, tmp_path, capsys):
    records = tmp_path / "chat.jsonl"
    with records.open("w") as f:
        for i in range(120):
            f.write(json.dumps({"prompt": f"Is {i} a number?", "response": "yes"}) + "\n")
    sft = compose_train(
        *TINY,
        "stage=sft",
        "data=sft_jsonl",
        f"data.path={records}",
        f"data.tokenizer={data_dir}",
        f"stage.init_from={pretrained}",
        "stage.num_steps=40",
        "stage.learning_rate=3e-3",
        "stage.warmup_steps=0",
        "sample.prompt='Is 7 a number?'",
        "sample.temperature=0",
        run_dir=tmp_path / "sft",
    )
    exp.run.train(sft)
    assert (tmp_path / "sft" / "checkpoints" / "step_00000040" / "tokenizer.json").is_file()
    # the run's own end-of-run sample: sample.prompt as the user's turn, the reply up to <|end|>
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["sample"] == "yes"
    capsys.readouterr()
    args = [
        str(tmp_path / "sft"),
        "--chat",
        "--prompt",
        "Is 7 a number?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "30",
    ]
    assert generate_main(args) == 0
    assert capsys.readouterr().out == "yes\n"  # the reply, ended by <|end|>, which is not printed
