"""Text from a model, token by token, with its tokenizer: a continuation of a prompt (stop strings, end-of-text), and
an assistant's reply in the chat template SFT trains on. Used by `python -m exp.generate` and by a run's own
end-of-run sample."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from exp.data.sft.template import chat_markers, chat_prompt
from exp.data.tokenizer import ByteTokenizer
from exp.model.protocol import generate

log = logging.getLogger("exp")

CODE_PROMPT = "def "  # Python text's own way into a function: what the stdlib corpus's validation text gives
PYTHON_DEF = re.compile(r"^[ \t]*(async )?def \w+\(", re.M)
PROMPT_WORDS = 4  # prose: the first words of a validation document
PROMPT_TOKENS = 16_384  # the validation text read to choose a prompt


def data_prompt(data, tokenizer) -> str:
    """The end-of-run sample's prompt from the data's own validation text (token data: `arrays()`), else "" (the
    model starts a document of its own). See prompt_from_text for the rule."""
    if tokenizer is None or not hasattr(data, "arrays"):
        return ""
    train, val = data.arrays()
    ids = np.asarray(val[:PROMPT_TOKENS]).tolist()
    document = ids[: ids.index(tokenizer.EOT)] if tokenizer.EOT in ids else ids
    # split by documents, train ends with an end-of-text and val starts a document; split by tokens, mid-line
    whole = len(train) == 0 or int(train[-1]) == tokenizer.EOT
    return prompt_from_text(tokenizer.decode(ids), tokenizer.decode(document), whole)


def prompt_from_text(text: str, document: str, starts_at_document: bool = True) -> str:
    """Python (a `def name(` line in the validation text): "def ", as a code corpus's own functions begin. Otherwise
    the first PROMPT_WORDS words of the first validation document's first line with text (its first whole line when
    the validation text starts mid-document), or "" when there is none."""
    if PYTHON_DEF.search(text):
        return CODE_PROMPT
    lines = document.split("\n")
    lines = lines if starts_at_document else lines[1:]
    line = next((ln.strip() for ln in lines if ln.strip() and "\ufffd" not in ln), "")
    return " ".join(line.split()[:PROMPT_WORDS])


def generate_text(
    model,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    stop: Sequence[str] = (),
    stop_at_eot: bool = True,
    tokenizer=None,
) -> str:
    """Prompt plus up to max_new_tokens sampled tokens, decoded with the model's tokenizer (bytes by default).

    Generation ends at the end-of-text token (not printed) unless stop_at_eot is false, and as soon as
    the decoded continuation contains one of the stop strings; the text is then cut before the first
    of them. A stop string may span several tokens; one inside the prompt does not count.
    """
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    ids = tokenizer.encode(prompt) or [tokenizer.EOT]  # an empty prompt starts from end-of-text
    stop_ids = [tokenizer.EOT] if stop_at_eot else []
    text = StopText(stop, tokenizer)
    for token in stream_tokens(model, ids, max_new_tokens, temperature, top_k, seed, stop_ids, tokenizer.vocab_size):
        if token in stop_ids or text.add(token):
            break
    return prompt + text.result()


def stream_tokens(model, ids, max_new_tokens, temperature, top_k, seed, stop_ids, vocab_limit) -> Iterator[int]:
    """New token ids one at a time. One token per call draws the same tokens as one call for all of them (one
    sample per step from the same generator), so a caller may stop early or print as they come."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)
    generator = torch.Generator(device).manual_seed(seed)
    kw = dict(temperature=temperature, top_k=top_k, generator=generator, stop_token_ids=stop_ids)
    for _ in range(max_new_tokens):
        idx = generate(model, idx, 1, vocab_limit=vocab_limit, **kw)
        token = int(idx[0, -1])
        yield token
        if token in stop_ids:
            return


class StopText:
    """Decoded continuation, token by token; watches for stop strings. The whole continuation is decoded
    again at each token (a BPE token can complete a character that earlier ones began), and a trailing
    U+FFFD of an unfinished character is not searched until it is complete."""

    def __init__(self, stop: Sequence[str], tokenizer):
        self.stop, self.tokenizer, self.ids, self.text, self.cut = list(stop), tokenizer, [], "", None

    def add(self, token: int) -> bool:
        """Append one token; True once the text contains a stop string."""
        before = len(self.text.rstrip("\ufffd"))  # an unfinished character may change: search from before it
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        return self._search(before)

    def new_text(self, printed: int) -> str:
        """The text after the first `printed` characters that is final (no unfinished character at its end)."""
        return self.text.rstrip("\ufffd")[printed:]

    def result(self) -> str:
        """The continuation, cut before the first stop string."""
        return self.text if self.cut is None else self.text[: self.cut]

    def _search(self, before: int) -> bool:
        # only a match that ends in the new text is new; earlier text was searched before
        found = [i for s in self.stop if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if found:
            self.cut = min(found)
        return bool(found)


def chat_reply(model, tokenizer, turns, max_new_tokens, temperature, top_k, seed, out=None) -> str:
    """The assistant's next turn after `turns`, in the chat template SFT trained on; printed to `out` as it
    is generated; it ends at `<|end|>` (or end-of-text) and is returned without it."""
    ids = chat_prompt(turns, tokenizer)
    stop_ids = [chat_markers(tokenizer)[1], tokenizer.EOT]
    text, printed = StopText((), tokenizer), 0
    for token in stream_tokens(model, ids, max_new_tokens, temperature, top_k, seed, stop_ids, tokenizer.vocab_size):
        if token in stop_ids:
            break
        text.add(token)
        if out is not None:
            new = text.new_text(printed)
            printed += len(new)
            out.write(new)
            out.flush()
    if out is not None:
        out.write(text.result()[printed:] + "\n")
        out.flush()
    return text.result()


def end_of_run_sample(model, data, tokenizer, sample, rt, chat: bool) -> str | None:
    """The end-of-run sample (run.sample), logged: from sample.prompt, else (chat) SAMPLE_CHAT_PROMPT as the user's
    turn, else the data's own prompt (data_prompt: "def " for code); None without a tokenizer or with no tokens."""
    prompt = sample.prompt
    if prompt is None:
        prompt = SAMPLE_CHAT_PROMPT if chat else data_prompt(data, tokenizer)
    text = generate_sample(model, sample, prompt, tokenizer, rt, chat=chat)
    if text is not None and chat:
        log.info(f"sample (the reply to the user's turn, up to <|end|>):\n{prompt.rstrip()}\n> {text}")
    elif text is not None:
        log.info(f"sample:\n{prompt}{text}")
    return text


# the end-of-run sample's prompt of an SFT run when sample.prompt is null: a user's turn like the default SFT set's,
# a def line and its docstring, answered with the body
SAMPLE_CHAT_PROMPT = 'def clamp(value, low, high):\n    """Return value limited to the range [low, high]."""\n'


@torch.no_grad()
def generate_sample(model, sample, prompt: str, tokenizer, rt, chat: bool = False) -> str | None:
    """Text continued from `prompt` by the trained model (ending at end-of-text), or with `chat` the assistant's
    reply to `prompt` as a user's turn in the chat template; None when the data has no tokenizer."""
    if sample.max_new_tokens == 0 or tokenizer is None:
        return None
    if chat:
        model.eval()
        try:
            with rt.autocast():
                turns = [{"role": "user", "content": prompt}]
                return chat_reply(
                    model,
                    tokenizer.with_chat_tokens(),
                    turns,
                    sample.max_new_tokens,
                    sample.temperature,
                    sample.top_k,
                    seed=0,
                )
        finally:
            model.train()
    ids = torch.tensor([tokenizer.encode(prompt) or [tokenizer.EOT]], device=rt.device)
    generator = torch.Generator(rt.device).manual_seed(0)
    model.eval()
    with rt.autocast():
        out = generate(
            model,
            ids,
            sample.max_new_tokens,
            temperature=sample.temperature,
            top_k=sample.top_k,
            generator=generator,
            stop_token_ids=[tokenizer.EOT],
            vocab_limit=tokenizer.vocab_size,
        )
    model.train()
    return tokenizer.decode([i for i in out[0, ids.size(1) :].tolist() if i != tokenizer.EOT])
