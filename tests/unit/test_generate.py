"""Stopping generation: at a stop token in GPT.generate, at end-of-text and at --stop strings in exp.generate."""

import random

import pytest
import torch

from exp.data.tokenizer import EOT, ByteTokenizer
from exp.generate import generate_text
from exp.model import GPT
from exp.sampling import StopText

# A successor table: the model's greedy next token depends only on the current one. "é" is two byte
# tokens, so a stop string can span tokens and split a character.
CHAIN = [*b"ab", *"é".encode(), *b"cd", EOT]  # a b 0xC3 0xA9 c d <|endoftext|> (then a again)
MODEL = dict(vocab_size=264, seq_len=16, n_layer=1, n_head=2, d_model=16, tie_embeddings=False)


def successor_model() -> GPT:
    """A tiny GPT whose argmax after token CHAIN[i] is CHAIN[i + 1] (cyclic), whatever came before.

    Every block is zeroed (its norms output 0, so attention and MLP add nothing): the final hidden state
    is the current token's embedding, a basis vector, and the untied lm head maps it to its successor.
    """
    torch.manual_seed(0)
    model = GPT(**MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        for i, tok in enumerate(CHAIN):
            model.tok_emb.weight[tok, i] = 1.0
            model.lm_head.weight[CHAIN[(i + 1) % len(CHAIN)], i] = 10.0  # logit 40 vs 0: sampling agrees too
    return model.eval()


def ids(text: str) -> torch.Tensor:
    return torch.tensor([ByteTokenizer().encode(text)])


def test_generate_stops_a_single_row_at_a_stop_token():
    model = successor_model()
    out = model.generate(ids("a"), 12, temperature=0.0)
    assert out[0].tolist() == [*CHAIN, *CHAIN[:6]]  # without stop tokens, as before: all 12, past end-of-text
    out = model.generate(ids("a"), 12, temperature=0.0, stop_token_ids=[EOT])
    assert out[0].tolist() == CHAIN  # ends right after the stop token, which is kept
    sampled = model.generate(ids("a"), 12, generator=torch.Generator().manual_seed(0), stop_token_ids=[EOT])
    assert sampled[0].tolist() == CHAIN
    assert model.generate(ids("a"), 3, temperature=0.0, stop_token_ids=[EOT])[0].tolist() == CHAIN[:4]
    assert model.generate(ids("a"), 12, temperature=0.0, stop_token_ids=[ord("c")])[0].tolist() == CHAIN[:5]


def test_generate_batch_pads_finished_rows_with_their_stop_token_and_ends_when_all_stopped():
    idx = torch.tensor([[ord("a")], [ord("c")]])
    out = successor_model().generate(idx, 12, temperature=0.0, stop_token_ids=[EOT, ord("b")])
    # row 0 stops at b after one token and repeats it; row 1 stops at end-of-text after two, and so does the batch
    assert out.tolist() == [[ord("a"), ord("b"), ord("b")], [ord("c"), ord("d"), EOT]]


def test_generate_text_stops_at_end_of_text_without_printing_it():
    model = successor_model()
    assert generate_text(model, "a", 50, 0.0, None, 0) == "abécd"
    assert generate_text(model, "a", 50, 1.0, 40, 0) == "abécd"
    past = generate_text(model, "a", 10, 0.0, None, 0, stop_at_eot=False)
    assert past == "abécd<|endoftext|>abé"  # 10 tokens: é is two


@pytest.mark.parametrize(
    "stop, expected",
    [
        (["cd"], "abé"),  # two tokens
        (["éc"], "ab"),  # three tokens, starting inside a two-byte character
        (["é"], "ab"),
        (["d", "bé"], "a"),  # the first to appear ends it, whatever the order they are given in
        (["cd", "écd"], "ab"),  # both complete at the same token: the earlier start wins
        (["zz"], "abécd"),  # never seen: ends at end-of-text
        (["d"] * 3, "abéc"),
    ],
)
def test_generate_text_cuts_before_stop_strings(stop, expected):
    assert generate_text(successor_model(), "a", 50, 0.0, None, 0, stop=stop) == expected


def test_stop_string_in_the_prompt_does_not_count_and_one_after_end_of_text_does():
    model = successor_model()
    assert generate_text(model, "ab", 50, 0.0, None, 0, stop=["ab"], stop_at_eot=False) == "abécd<|endoftext|>"
    assert generate_text(model, "a", 50, 0.0, None, 0, stop=["<|endoftext|>a"], stop_at_eot=False) == "abécd"
    # max_new_tokens ends it first, halfway through "é": the lone byte decodes as U+FFFD, as without stop strings
    cut_short = generate_text(model, "a", 2, 0.0, None, 0, stop=["cd"])
    assert cut_short == "ab\ufffd" == generate_text(model, "a", 2, 0.0, None, 0)


def test_stop_strings_do_not_change_what_is_sampled():
    torch.manual_seed(3)
    model = GPT(**MODEL).eval()  # random weights: a spread-out distribution, every step draws from the generator
    plain = generate_text(model, "def ", 40, 1.0, None, 5, stop_at_eot=False)
    watched = generate_text(model, "def ", 40, 1.0, None, 5, stop=["\x00never"], stop_at_eot=False)
    assert watched == plain and len(ByteTokenizer().encode(plain)) > 4


def test_incremental_decoding_matches_the_tokenizer():
    rng = random.Random(0)
    pool = [*range(256), *"é€😀".encode() * 10, EOT, EOT + 5]
    for _ in range(500):
        tokens = [rng.choice(pool) for _ in range(rng.randint(0, 12))]
        text = StopText([], ByteTokenizer())
        for t in tokens:
            assert not text.add(t)
        assert text.result() == ByteTokenizer().decode(tokens)
