"""exp's model in memory as an lm-evaluation-harness language model (`lm_eval.api.model.TemplateLM`).

The harness asks three things of a model: the log-likelihood of a continuation given a context (multiple choice),
the log-likelihood of a whole text in rolling windows (perplexity tasks), and greedy or sampled text until a stop
string (generative tasks). `ExpLM` answers them with the run's own model and tokenizer, batched, in the stage's
dtype, on whatever device the model is on: no export, no second copy of the weights.

It scores exactly as the harness's Hugging Face path (`lm_eval --model hf`) does on an exported model: the same
context/continuation split (the harness's own `_encode_pair`), the same left truncation to the model's context,
the same rolling windows, log-softmax over every row of the (padded) vocabulary. Sequences of a batch are padded
on the right, which a causal model never attends to.

Distributed: the harness hands each rank its share of the requests and gathers the results on rank 0 through
`all_gather` / `gather_object`. FSDP forwards are collective, so under FSDP every rank runs the same number of
forwards: rolling windows and batches are padded to the largest rank's count and generation runs to the longest.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from exp.dist import Dist
from exp.model.protocol import declared, logits_of

log = logging.getLogger("exp")


class ExpLM(TemplateLM):
    """An lm-eval model over an exp model and tokenizer (exp.data.tokenizer: bytes or a tokenizer.json).

    model: what forwards run through (an FSDP module under FSDP; the plain model otherwise). autocast: the
    stage's mixed-precision context (exp.hardware.Runtime.autocast), or None for float32. max_length: the
    longest input, by default the model's declared seq_len.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_size: int = 16,
        max_length: int | None = None,
        autocast: Callable | None = None,
        dist: Dist | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
        collective: bool = False,
    ):
        super().__init__()
        self.model, self.tok, self.batch_size = model, tokenizer, int(batch_size)
        self._max_length = int(max_length or declared(model, "seq_len") or 2048)
        self._autocast = autocast
        dist = dist or Dist()
        self.dist, self.max_gen_toks, self.seed = dist, int(max_gen_toks), int(seed)
        self.collective = collective  # FSDP: every rank runs the same forwards
        self._rank, self._world_size = dist.rank, dist.world_size
        param = next(model.parameters(), None)
        self._device = param.device if param is not None else torch.device("cpu")

    # what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        return self.tok.EOT

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tok.encode(string))  # exp trains without a BOS token: none is added

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    # the model's forwards

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax (float32) of each row's logits, (len(row), vocab), from one right-padded forward."""
        width = max(len(r) for r in rows)
        batch = torch.full((len(rows), width), self.tok.EOT, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast() if self._autocast else contextlib.nullcontext():
                logits = logits_of(self.model(batch.to(self._device)))
        finally:
            self.model.train(was_training)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        return [logprobs[i, : len(row)] for i, row in enumerate(rows)]

    def _batches(self, items: list) -> list[list]:
        """items in batches of batch_size; under FSDP, as many batches on every rank (padded with empty ones)."""
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        if self.collective:
            most = self.dist.max(len(batches))
            batches += [[] for _ in range(most - len(batches))]
        return batches

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding gives it) per request, in order.

        Longest first, so that a batch pads little; an empty batch (FSDP padding) still runs one forward."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for batch in self._batches(order):
            rows, conts = [], []
            for i in batch:
                _, context, continuation = requests[i]
                if len(continuation) > self.max_length:
                    raise ValueError(
                        f"a continuation of {len(continuation)} tokens is longer than the model's context "
                        f"({self.max_length} tokens): it cannot be scored"
                    )
                rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
                conts.append(continuation)
            if not rows:  # keeps the collective forwards in step
                self._logprobs([[self.tok.EOT]])
                continue
            for i, logprobs, cont in zip(batch, self._logprobs(rows), conts, strict=True):
                scored = logprobs[-len(cont) :]
                target = torch.tensor(cont, device=scored.device)
                total = scored.gather(-1, target[:, None]).sum().item()
                results[i] = (total, bool((scored.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over disjoint windows of max_length tokens, the first conditioned on
        end-of-text (as the harness's own models do)."""
        windows, owners = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows) if windows or self.collective else []
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, scores, strict=True):
            totals[owner] += score
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text after each context until one of its `until` strings (cut there), the end-of-text token or
        max_gen_toks; greedy unless the request asks do_sample (then seeded sampling at its temperature)."""
        out: list[str | None] = [None] * len(requests)
        generator = torch.Generator().manual_seed(self.seed)
        for batch in self._batches(list(range(len(requests)))):
            texts = self._generate([requests[i].args for i in batch], generator)
            for i, text in zip(batch, texts, strict=True):
                out[i] = text
        return out

    def _generate(self, args: list[tuple[str, dict]], generator: torch.Generator) -> list[str]:
        options = [dict(kw or {}) for _, kw in args]
        until = [_stops(kw.pop("until", None), self.tok_decode([self.eot_token_id])) for kw in options]
        limit = [int(kw.pop("max_gen_toks", self.max_gen_toks)) for kw in options]
        longest = max(limit, default=0)
        rows = [
            self.tok_encode(context)[-max(1, self.max_length - n) :] or [self.eot_token_id]
            for (context, _), n in zip(args, limit, strict=True)
        ]
        new: list[list[int]] = [[] for _ in rows]
        done = [n == 0 for n in limit]
        if self.collective:
            longest = self.dist.max(longest)
        for _ in range(longest):
            if all(done) and not self.collective:
                break
            window = [(r + n)[-self.max_length :] for r, n in zip(rows, new, strict=True)] or [[self.eot_token_id]]
            last = [lp[-1] for lp in self._logprobs(window)]
            if self.collective and not self.dist.any(not all(done)):
                break
            for i, logprobs in enumerate(last[: len(rows)]):
                if done[i]:
                    continue
                token = _choose(logprobs, options[i], generator)
                new[i].append(token)
                text = self.tok_decode(new[i])
                if token == self.eot_token_id or any(s in text for s in until[i]) or len(new[i]) >= limit[i]:
                    done[i] = True
        results = []
        for i, ids in enumerate(new):
            text = self.tok_decode([t for t in ids if t != self.eot_token_id])
            for stop in until[i]:
                text = text.split(stop)[0]
            results.append(text)
        return results

    # distributed: the harness shares requests out and gathers results through these

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.dist.all_gather_tensor(tensor)

    def gather_object(self, obj, dst: int = 0):
        return self.dist.gather_objects(obj, dst)

    def barrier(self) -> None:
        self.dist.barrier()


def _stops(until, eot_text: str) -> list[str]:
    if until is None:
        return [eot_text]
    return [until] if isinstance(until, str) else [s for s in until if s]


def _choose(logprobs: torch.Tensor, options: dict, generator: torch.Generator) -> int:
    """Greedy, unless the request asks do_sample with a temperature above 0."""
    temperature = float(options.get("temperature", 0.0) or 0.0)
    if not options.get("do_sample") or temperature <= 0:
        return int(logprobs.argmax())
    probs = torch.softmax(logprobs.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
