"""Sample text from a checkpoint, run directory or export folder: python -m exp.generate CHECKPOINT --prompt "def ".

Generation ends at the end-of-text token (not printed), at --max-new-tokens, or at a --stop string (cut before it)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

import torch

from exp.checkpoint import CheckpointError, load_model_for_inference, saved_tokenizer
from exp.checkpoint.weights import ALLOW_TARGET_HELP
from exp.data.sft.template import chat_markers, chat_prompt
from exp.data.tokenizer import ByteTokenizer
from exp.hardware import resolve_device
from exp.model.protocol import generate, model_spec
from exp.text import first_line


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
    text = _StopText(stop, tokenizer)
    for token in _stream(model, ids, max_new_tokens, temperature, top_k, seed, stop_ids, tokenizer.vocab_size):
        if token in stop_ids or text.add(token):
            break
    return prompt + text.result()


def _stream(model, ids, max_new_tokens, temperature, top_k, seed, stop_ids, vocab_limit) -> Iterator[int]:
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


class _StopText:
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


def model_tokenizer(path, model):
    """The tokenizer saved with the model (tokenizer.json, or byte tokens); CheckpointError when it is unknown or
    larger than the model's vocabulary."""
    tokenizer = saved_tokenizer(path)
    vocab_size, _ = model_spec(model)
    if tokenizer is None:
        raise CheckpointError(
            f"{path}: has no tokenizer.json and model vocab_size={vocab_size} is not the byte tokenizer's "
            f"{ByteTokenizer.vocab_size}; this model was trained on other tokens"
        )
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"{path}: its tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size={vocab_size}"
        )
    return tokenizer


def chat_reply(model, tokenizer, turns, max_new_tokens, temperature, top_k, seed, out=None) -> str:
    """The assistant's next turn after `turns`, in the chat template SFT trained on; printed to `out` as it
    is generated; it ends at `<|end|>` (or end-of-text) and is returned without it."""
    ids = chat_prompt(turns, tokenizer)
    stop_ids = [chat_markers(tokenizer)[1], tokenizer.EOT]
    text, printed = _StopText((), tokenizer), 0
    for token in _stream(model, ids, max_new_tokens, temperature, top_k, seed, stop_ids, tokenizer.vocab_size):
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


def _chat(args, model, tokenizer) -> None:
    """--chat: one reply to --prompt, or a conversation with the user turns read from stdin, line by line."""
    turns = [{"role": "system", "content": args.system}] if args.system else []
    users = [args.prompt] if args.prompt else (line.rstrip("\n") for line in sys.stdin)
    interactive = not args.prompt and sys.stdin.isatty()
    if interactive:
        print("(one message per line; Ctrl-D ends)", file=sys.stderr)
    for i, user in enumerate(users):
        if not user.strip():
            continue
        turns.append({"role": "user", "content": user})
        if interactive:
            print("assistant: ", end="", flush=True)
        reply = chat_reply(
            model,
            tokenizer,
            turns,
            args.max_new_tokens,
            args.temperature,
            args.top_k or None,
            args.seed + i,
            sys.stdout,
        )
        turns.append({"role": "assistant", "content": reply})


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on any checkpoint, config or vocabulary error)."""
    parser = argparse.ArgumentParser(prog="python -m exp.generate", description=__doc__)
    parser.add_argument("checkpoint", help="checkpoint folder, run directory or export folder")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    parser.add_argument("--top-k", type=int, default=40, help="0 samples from the whole vocabulary")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end when the continuation contains TEXT, and cut it there (repeatable)",
    )
    parser.add_argument(
        "--ignore-eot", action="store_true", help="generate past the end-of-text token (printed as <|endoftext|>)"
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="talk to an SFT model in its chat template: --prompt is the user's turn (or one turn per stdin line); "
        "the reply streams and ends at <|end|>",
    )
    parser.add_argument("--system", default="", help="with --chat: the system turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--allow-target", action="append", default=[], metavar="PREFIX", help=ALLOW_TARGET_HELP)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        parser.error("--max-new-tokens, --temperature and --top-k must be >= 0")
    if "" in args.stop:
        parser.error("--stop needs a non-empty string")
    try:
        model, _ = load_model_for_inference(args.checkpoint, resolve_device(args.device), allow=args.allow_target)
        tokenizer = model_tokenizer(args.checkpoint, model)
        if args.chat:
            _chat(args, model, tokenizer.with_chat_tokens())
            return 0
        text = generate_text(
            model,
            args.prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_k or None,
            args.seed,
            stop=args.stop,
            stop_at_eot=not args.ignore_eot,
            tokenizer=tokenizer,
        )
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
