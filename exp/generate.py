"""Sample text from a checkpoint, run directory or export folder: python -m exp.generate CHECKPOINT --prompt "def ".

Generation ends at the end-of-text token (not printed), at --max-new-tokens, or at a --stop string (cut before it)."""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Sequence

import torch

from exp.checkpoint import CheckpointError, load_model_for_inference
from exp.checkpoint.weights import ALLOW_TARGET_HELP
from exp.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer
from exp.hardware import resolve_device
from exp.model.protocol import generate, model_spec


def generate_text(
    model,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    stop: Sequence[str] = (),
    stop_at_eot: bool = True,
) -> str:
    """Prompt plus up to max_new_tokens sampled tokens, decoded with the byte tokenizer.

    Generation ends at the end-of-text token (not printed) unless stop_at_eot is false, and as soon as
    the decoded continuation contains one of the stop strings; the text is then cut before the first
    of them. A stop string may span several tokens; one inside the prompt does not count.
    """
    tokenizer = ByteTokenizer()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.EOT]  # an empty prompt starts from end-of-text
    idx = torch.tensor([ids], device=device)
    generator = torch.Generator(device).manual_seed(seed)
    stop_ids = [tokenizer.EOT] if stop_at_eot else []
    kw = dict(temperature=temperature, top_k=top_k, generator=generator, stop_token_ids=stop_ids)
    if not stop:
        new = generate(model, idx, max_new_tokens, **kw)[0, len(ids) :].tolist()
        return prompt + tokenizer.decode(new[:-1] if new and new[-1] in stop_ids else new)
    # One token per call draws the same tokens as one call for all of them (one sample per step from
    # the same generator); in between, the continuation is decoded incrementally and searched.
    text = _StopText(stop)
    for _ in range(max_new_tokens):
        idx = generate(model, idx, 1, **kw)
        token = int(idx[0, -1])
        if token in stop_ids or text.add(token):
            break
    return prompt + text.result()


class _StopText:
    """Decoded continuation, token by token, as ByteTokenizer.decode would give it; watches for stop strings."""

    def __init__(self, stop: Sequence[str]):
        self.stop, self.text, self.cut = list(stop), "", None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> bool:
        """Append one token; True once the text contains a stop string."""
        before = len(self.text)
        if token < 256:
            self.text += self.decoder.decode(bytes([token]))
        else:  # a special token ends the byte run, as in ByteTokenizer.decode
            self.text += self.decoder.decode(b"", final=True) + SPECIAL_TOKENS[token - 256]
            self.decoder.reset()
        return self._search(before)

    def result(self) -> str:
        """The continuation, cut before the first stop string."""
        if self.cut is None:
            before = len(self.text)
            self.text += self.decoder.decode(b"", final=True)  # bytes of an unfinished character
            self._search(before)
        return self.text if self.cut is None else self.text[: self.cut]

    def _search(self, before: int) -> bool:
        # only a match that ends in the new text is new; earlier text was searched before
        found = [i for s in self.stop if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if found:
            self.cut = min(found)
        return bool(found)


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
        vocab_size, _ = model_spec(model)
        if vocab_size != ByteTokenizer.vocab_size:
            raise CheckpointError(
                f"{args.checkpoint}: model vocab_size={vocab_size} does not match the byte tokenizer's "
                f"{ByteTokenizer.vocab_size}; this model was trained on other tokens"
            )
        text = generate_text(
            model,
            args.prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_k or None,
            args.seed,
            stop=args.stop,
            stop_at_eot=not args.ignore_eot,
        )
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
