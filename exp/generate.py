"""Sample text from a checkpoint, run directory or export folder (exp's, or `--format hf`'s): python -m exp.generate
CHECKPOINT --prompt "def ".

Generation ends at the end-of-text token (not printed), at --max-new-tokens, or at a --stop string (cut before it)."""

from __future__ import annotations

import argparse
import sys

from exp.checkpoint import CheckpointError, load_model_for_inference, saved_tokenizer
from exp.checkpoint.weights import ALLOW_TARGET_HELP
from exp.data.tokenizer import ByteTokenizer
from exp.hardware import resolve_device
from exp.model.protocol import model_spec
from exp.sampling import chat_reply, generate_text
from exp.text import first_line

__all__ = ["chat_reply", "generate_text", "main", "model_tokenizer"]


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


def load_with_tokenizer(path, device, allow=()):
    """(model, tokenizer) of a checkpoint, run directory, exp export or `--format hf` export folder (exp.generate and
    exp.eval read models this way)."""
    from exp.checkpoint.hf_folder import gpt_config, hf_folder_tokenizer, is_hf_folder, load_hf_folder, read_hf_config

    if is_hf_folder(path):
        try:
            gpt_config(read_hf_config(path), path)
        except CheckpointError:  # not a Llama exp's GPT expresses: transformers builds it (exp.model.HFCausalLM)
            pass
        else:  # read as exp's GPT: transformers is not needed
            return load_hf_folder(path, device)[0], hf_folder_tokenizer(path)
    model, _ = load_model_for_inference(path, device, allow=allow)
    return model, model_tokenizer(path, model)


def _load(args):
    return load_with_tokenizer(args.checkpoint, resolve_device(args.device), args.allow_target)


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on any checkpoint, config or vocabulary error)."""
    parser = argparse.ArgumentParser(prog="python -m exp.generate", description=__doc__)
    parser.add_argument("checkpoint", help="checkpoint folder, run directory or export folder (also --format hf)")
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
        model, tokenizer = _load(args)
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
