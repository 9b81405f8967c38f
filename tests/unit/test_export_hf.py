"""--format hf: transformers loads the export as a causal LM with exp's logits, greedy tokens and tokenizer ids."""

import json
import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from exp import export, schedules
from exp.checkpoint import save_checkpoint
from exp.data.bpe import encode, train_bpe
from exp.data.sft.template import encode_chat
from exp.data.tokenizer import ByteTokenizer
from exp.model import GPT

from ..conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SIZES = dict(seq_len=32, n_layer=2, n_head=4, d_model=32)
TEXT = "def naïve(x):\n    return x  # ü ß 日本語 🎉 — «ok»\n"  # 1- to 4-byte UTF-8 characters
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2 + 2 = ?"},
    {"role": "assistant", "content": "4 ✓"},
]


def write_checkpoint(root, seed=0, vocab_size=264, files=None, **model_kw):
    """A checkpoint of a GPT whose every weight, norms included, is random: a swapped or misnamed tensor
    changes the logits (trained-from-init norms are all ones and would hide a swap)."""
    torch.manual_seed(seed)
    model = GPT(vocab_size=vocab_size, **{**SIZES, **model_kw})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    node = {"_target_": "exp.model.GPT", "vocab_size": vocab_size, **{**SIZES, **model_kw}}
    path = save_checkpoint(
        root,
        1,
        model=model,
        optimizer=opt,
        scheduler=schedules.cosine(opt, 10),
        trainer_state={"step": 1},
        config_yaml=OmegaConf.to_yaml(OmegaConf.create({"model": node, "seed": 0})),
        files=files,
    )
    return path, model.eval()


def load_hf(out, **kw):
    return AutoModelForCausalLM.from_pretrained(out, local_files_only=True, **kw).eval()


def tokens(vocab_size, seed=1):
    return torch.randint(vocab_size, (3, SIZES["seq_len"]), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "model_kw",
    [
        {},
        {"n_kv_head": 2},
        {"n_kv_head": 1, "tie_embeddings": False},
        {"rope_theta": 50.0, "norm_eps": 1e-3, "mlp_hidden": 48},
    ],
    ids=["default", "gqa", "mqa_untied", "rope_theta_eps_mlp"],
)
def test_transformers_gives_exp_logits_and_greedy_tokens(tmp_path, capsys, model_kw):
    path, model = write_checkpoint(tmp_path / "ckpts", **model_kw)
    out = tmp_path / "hf"
    assert export.main([str(path), str(out), "--format", "hf"]) == 0
    assert "as transformers float32" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "config.json",
        "export.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["max_position_embeddings"] == 32
    assert config["tie_word_embeddings"] == model_kw.get("tie_embeddings", True)

    hf = load_hf(out)
    assert hf.config.num_key_value_heads == model_kw.get("n_kv_head", 4)
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == model_kw.get("tie_embeddings", True)
    x = tokens(264)
    with torch.no_grad():
        expected, got = model(x)[0], hf(x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if "rope_theta" in model_kw:  # transformers 4.x reads the top-level key, 5.x rope_parameters: both hold it
        config.pop("rope_parameters")
        (out / "config.json").write_text(json.dumps(config))
        with torch.no_grad():
            torch.testing.assert_close(load_hf(out)(x).logits, expected, atol=1e-4, rtol=1e-4)

    prompt = x[:1, :6]
    stops = hf.generation_config.eos_token_id
    assert stops == [256, 261]  # <|endoftext|>, and <|end|> for chat replies
    mine = model.generate(prompt, 24, temperature=0, stop_token_ids=stops)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    assert theirs.tolist() == mine.tolist()


def test_bfloat16_export_loads_in_bfloat16(tmp_path, capsys):
    path, model = write_checkpoint(tmp_path / "ckpts", n_kv_head=2)
    out = tmp_path / "hf"
    assert export.main([str(path), str(out), "--format", "hf", "--dtype", "bfloat16"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert f.metadata()["format"] == "pt"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = load_hf(out, torch_dtype="auto")  # torch_dtype: the 4.x keyword, which 5.x still takes
    assert hf.dtype == torch.bfloat16
    x = tokens(264)
    with torch.no_grad():
        exact, got = model(x)[0], hf(x).logits.float()
        exp_bf16 = model.to(torch.bfloat16)(x)[0].float()
    # As far from the float32 logits as exp's own model is in bfloat16 (rounding differs, so not equal to it).
    assert (got - exact).abs().mean() < 1.5 * (exp_bf16 - exact).abs().mean()


def test_byte_tokenizer_gives_exp_ids_and_chat_template(tmp_path):
    path, _ = write_checkpoint(tmp_path / "ckpts")
    out = export.export_checkpoint(path, tmp_path / "hf", format="hf")
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok(TEXT)["input_ids"]
    assert ids == ByteTokenizer().encode(TEXT) and len(ids) > len(TEXT)  # multi-byte characters: one id per byte
    assert tok.decode(ids) == TEXT
    specials = ByteTokenizer.specials
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (256, 257, 256)
    assert [tok.convert_tokens_to_ids(t) for t in specials] == list(specials.values())
    assert {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"} <= set(tok.all_special_tokens)
    assert len(tok) == 264
    # exp's SFT template, as transformers renders it
    rendered = tok.apply_chat_template(TURNS, tokenize=True, return_dict=True)["input_ids"]
    assert rendered == encode_chat(TURNS)[0]
    prompt = tok.apply_chat_template(TURNS[:2], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt["input_ids"] == encode_chat(TURNS[:2])[0][:-1] + [specials["<|assistant|>"]]


def bpe_tokenizer(tmp_path):
    """A byte-level BPE trained here on text this test writes; specials take ids 0..7."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT + "for i in range(10):\n    print(i, 'naïve')\n") * 50)
    tok = train_bpe([corpus.read_text()], vocab_size=300)
    return tok, tok.to_str().encode("utf-8")


def test_bpe_tokenizer_from_the_checkpoint_or_tokenizer_option(tmp_path):
    tok, raw = bpe_tokenizer(tmp_path)
    vocab = 320  # an embedding larger than the tokenizer's 300 ids (padded)
    path, model = write_checkpoint(tmp_path / "ckpts", vocab_size=vocab, files={"tokenizer.json": raw})
    out = export.export_checkpoint(path, tmp_path / "hf", format="hf")
    assert (out / "tokenizer.json").read_bytes() == raw
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = hf_tok(TEXT)["input_ids"]
    assert ids == encode(tok, TEXT) and len(ids) < len(TEXT.encode())  # merges in use
    assert hf_tok.decode(ids) == TEXT
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1)
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"], config["pad_token_id"]) == (vocab, 0, 1)

    hf = load_hf(out)
    x = torch.tensor([ids[: SIZES["seq_len"]]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=1e-4)

    # A checkpoint without one takes --tokenizer (a folder holding tokenizer.json, or the file).
    bare, _ = write_checkpoint(tmp_path / "bare", vocab_size=vocab)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(raw)
    for given in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        assert export.main([str(bare), str(tmp_path / "hf2"), "--format", "hf", "--tokenizer", str(given)]) == 0
        assert (tmp_path / "hf2" / "tokenizer.json").read_bytes() == raw  # an earlier export is replaced whole


@pytest.mark.parametrize(
    "case, expected",
    [
        ("moe", "cannot export a mixture-of-experts model (num_experts=4)"),
        ("missing", "does not exist"),
        ("bad_dtype", "--dtype float64: must be one of float32, bfloat16, float16"),
        ("dtype_without_hf", "--dtype and --tokenizer go with --format hf"),
        ("other_vocab", "vocab_size=320 is not the byte tokenizer's 264"),
        ("missing_tokenizer", "no such tokenizer.json"),
        ("tokenizer_too_big", "its 300 tokens do not fit the model's vocab_size=264"),
        ("not_a_tokenizer", "not a Hugging Face tokenizer.json"),
        ("out_not_empty", "exists and is not an empty folder or an earlier export"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, case, expected):
    out, args = tmp_path / "out", ["--format", "hf"]
    if case == "moe":
        path, _ = write_checkpoint(tmp_path / "ckpts", num_experts=4)
    elif case == "missing":
        path = tmp_path / "nowhere"
    elif case == "other_vocab":
        path, _ = write_checkpoint(tmp_path / "ckpts", vocab_size=320)
    else:
        path, _ = write_checkpoint(tmp_path / "ckpts")
    if case == "bad_dtype":
        args += ["--dtype", "float64"]
    elif case == "dtype_without_hf":
        args = ["--dtype", "bfloat16"]
    elif case == "missing_tokenizer":
        args += ["--tokenizer", str(tmp_path / "no.json")]
    elif case == "tokenizer_too_big":
        args += ["--tokenizer", str(tmp_path / "tok.json")]
        (tmp_path / "tok.json").write_bytes(bpe_tokenizer(tmp_path)[1])
    elif case == "not_a_tokenizer":
        args += ["--tokenizer", str(tmp_path / "tok.json")]
        (tmp_path / "tok.json").write_text('{"model": 3}')
    elif case == "out_not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert export.main([str(path), str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out folder, no temporary one
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("model_kw", [{}, {"n_kv_head": 2, "tie_embeddings": False, "rope_theta": 500.0}])
def test_generate_reads_the_hf_folder_and_writes_what_the_checkpoint_writes(tmp_path, capsys, model_kw):
    from exp import generate

    path, _ = write_checkpoint(tmp_path / "ckpts", **model_kw)
    out = tmp_path / "hf"
    assert export.main([str(path), str(out), "--format", "hf"]) == 0
    capsys.readouterr()
    opts = ["--prompt", "def f(x):", "--max-new-tokens", "24", "--temperature", "0", "--ignore-eot"]
    texts = []
    for source in (path, out):
        assert generate.main([str(source), *opts]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("def f(x):") and len(texts[0]) > len("def f(x):\n")


def test_generate_reads_an_hf_folder_with_a_bpe_tokenizer(tmp_path, capsys):
    from exp import generate

    _, raw = bpe_tokenizer(tmp_path)
    path, _ = write_checkpoint(tmp_path / "ckpts", vocab_size=320, files={"tokenizer.json": raw})
    out = tmp_path / "hf"
    assert export.main([str(path), str(out), "--format", "hf"]) == 0
    capsys.readouterr()
    texts = []
    for source in (path, out):
        assert generate.main([str(source), "--prompt", "def", "--max-new-tokens", "12", "--temperature", "0"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_greedy_generation_past_seq_len_agrees_with_transformers(tmp_path, capsys):
    """Generation keeps every token and goes on with rotary positions past seq_len, as transformers does: 2 x seq_len
    greedy tokens from the key/value cache equal the HF export's; within seq_len the cache changes nothing."""
    from exp.model.protocol import sample

    path, model = write_checkpoint(tmp_path / "ckpts", n_kv_head=2)
    out = tmp_path / "hf"
    assert export.main([str(path), str(out), "--format", "hf"]) == 0
    hf = load_hf(out)
    hf.generation_config.eos_token_id = None  # the whole length, whatever the tokens
    prompt = tokens(264)[:1, :5]
    n = 2 * SIZES["seq_len"]
    mine = model.generate(prompt, n, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)
    assert mine.shape[1] == 5 + n and theirs.tolist() == mine.tolist()
    within = SIZES["seq_len"] - 5
    uncached = sample(model, prompt, within, temperature=0, seq_len=SIZES["seq_len"])  # the loop without a cache
    assert torch.equal(model.generate(prompt, within, temperature=0), uncached)
