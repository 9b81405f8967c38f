"""model=hf's wrapper and transformers folders read into exp's GPT: tiny random models built here, nothing downloads."""

import sys

import pytest
import torch

from exp.checkpoint import CheckpointError
from exp.checkpoint.hf_folder import check_fits_gpt, gpt_config, load_into_gpt, read_hf_config
from exp.model import GPT, HFCausalLM
from exp.model.protocol import flops_per_token, model_spec, num_params

from ..hf_folders import gpt2_folder, llama_folder

transformers = pytest.importorskip("transformers")


def gpt_for(folder) -> GPT:
    cfg = gpt_config(read_hf_config(folder), folder)
    return GPT(**{k: v for k, v in cfg.items() if k != "_target_"})


@pytest.mark.parametrize("tied", [False, True])
def test_a_llama_folder_into_exps_gpt_gives_transformers_logits(tmp_path, tied):
    """GQA (4 query heads, 2 key/value), rotate_half RoPE, rms_norm_eps 1e-6, a tied or separate head."""
    folder = llama_folder(tmp_path / "llama", tokenizer=False, tie_word_embeddings=tied, rope_theta=5e5)
    model = gpt_for(folder)
    load_into_gpt(folder, model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids)[0], reference(ids).logits, rtol=0, atol=1e-4)


def test_shapes_that_differ_are_named(tmp_path):
    folder = llama_folder(tmp_path / "llama", tokenizer=False)
    model = gpt_for(folder)
    check_fits_gpt(folder, model)
    other = GPT(vocab_size=300, seq_len=64, n_layer=2, n_head=4, n_kv_head=4, d_model=64, mlp_hidden=128)
    with pytest.raises(CheckpointError, match=r"stage.init_from=.*: num_key_value_heads=2 .* model.n_kv_head=4"):
        check_fits_gpt(folder, other)
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not llama"):
        check_fits_gpt(gpt2_folder(tmp_path / "gpt2"), model)
    scaled = llama_folder(tmp_path / "scaled", tokenizer=False, hidden_act="gelu")
    with pytest.raises(CheckpointError, match="hidden_act=gelu"):
        gpt_for(scaled)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_wrapper_follows_exps_model_protocol(tmp_path, kind):
    folder = (llama_folder if kind == "llama" else gpt2_folder)(tmp_path / kind)
    model = HFCausalLM(str(folder))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    vocab = reference.config.vocab_size
    assert model.training and model.hf.training  # dropout trains (from_pretrained hands back eval mode)
    assert model_spec(model) == (vocab, 64)  # config.json's max_position_embeddings (GPT-2: n_positions)
    assert num_params(model) == sum(p.numel() for p in reference.parameters())  # a tied head once
    assert flops_per_token(model, 32) == 6 * num_params(model) + 12 * 2 * 64 * 32
    ids = torch.randint(0, vocab, (2, 16))
    assert model(ids).shape == (2, 16, vocab)
    grown = HFCausalLM(str(folder), vocab_size=vocab + 4, seq_len=32)
    assert (grown.vocab_size, grown.seq_len) == (vocab + 4, 32)
    rebuilt = HFCausalLM("moved/elsewhere", **grown.saved_arguments())  # from config.json alone: no folder read
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in grown.state_dict().items()}
    with torch.device("meta"):
        assert HFCausalLM(str(folder)).hf.get_input_embeddings().weight.is_meta


def test_bad_settings_name_the_key(tmp_path, monkeypatch):
    folder = llama_folder(tmp_path / "llama", tokenizer=False)
    with pytest.raises(ValueError, match=r"model.name_or_path=.*nowhere does not exist"):
        HFCausalLM(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="model.seq_len=128 exceeds the model's max_position_embeddings=64"):
        HFCausalLM(str(folder), seq_len=128)
    with pytest.raises(ValueError, match="model.attn_implementation=flash"):
        HFCausalLM(str(folder), attn_implementation="flash")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"not a local folder, nor found in the Hugging Face cache \(HF_HUB_OFFLINE"):
        HFCausalLM("exp-tests/no-such-model")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"model=hf needs Hugging Face transformers: pip install -e '.\[hf\]'"):
        HFCausalLM(str(folder))
