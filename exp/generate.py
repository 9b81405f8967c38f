"""Sample text from a checkpoint, run directory or export folder: python -m exp.generate CHECKPOINT --prompt "def "."""

from __future__ import annotations

import argparse
import sys

import torch

from exp.checkpoint import CheckpointError
from exp.data.tokenizer import ByteTokenizer
from exp.export import load_model_for_inference
from exp.hardware import resolve_device


def generate_text(model, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
    """Prompt plus max_new_tokens sampled tokens, decoded with the byte tokenizer."""
    tokenizer = ByteTokenizer()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.EOT]  # an empty prompt starts from end-of-text
    idx = torch.tensor([ids], device=device)
    generator = torch.Generator(device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return prompt + tokenizer.decode(out[0, len(ids) :].tolist())


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on any checkpoint, config or vocabulary error)."""
    parser = argparse.ArgumentParser(prog="python -m exp.generate", description=__doc__)
    parser.add_argument("checkpoint", help="checkpoint folder, run directory or export folder")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    parser.add_argument("--top-k", type=int, default=40, help="0 samples from the whole vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        parser.error("--max-new-tokens, --temperature and --top-k must be >= 0")
    try:
        model, _ = load_model_for_inference(args.checkpoint, device=resolve_device(args.device))
        if model.vocab_size != ByteTokenizer.vocab_size:
            raise CheckpointError(
                f"{args.checkpoint}: model vocab_size={model.vocab_size} does not match the byte tokenizer's "
                f"{ByteTokenizer.vocab_size}; this model was trained on other tokens"
            )
        text = generate_text(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
