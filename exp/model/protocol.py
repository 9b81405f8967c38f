"""The model protocol: what exp asks of a model, and the defaults a plain torch.nn.Module gets.

A model is any nn.Module whose forward maps token ids (B, T) int64 to logits (B, T, vocab). That is all
training needs. forward may instead return a tuple (or list) whose first item is the logits, or an object
with a `logits` attribute or key; the rest is ignored (exp.model.GPT returns (logits, loss)).

Everything else is optional. Each function below uses the model's own method or attribute when it has one,
and a default otherwise:

- num_params(model, exclude_embeddings)  model.num_params(exclude_embeddings=...), else the distinct
                                          parameters (minus nn.Embedding weights when excluding embeddings)
- flops_per_token(model, seq_len)         model.flops_per_token(seq_len), else 6 * num_params, plus the
                                          attention term 12 * n_layer * d_model * seq_len when declared
- generate(model, idx, max_new_tokens, temperature=, top_k=, generator=, stop_token_ids=)
                                          model.generate(...), else `sample`: forward over the last seq_len
                                          tokens (all of them when seq_len is not declared), one token a call
- model_spec(model) -> (vocab_size, seq_len)   declared values (below); an undeclared vocab_size is read
                                          off a one-token forward, an undeclared seq_len is None
- takes_documents(model)                  whether forward declares a `doc_ids` keyword: (B, T) ids of the documents
                                          packed in each row (data.document_mask); attention must then stay inside
                                          each document. A model without it is refused when the mask is asked for
- router_losses(model)                    model.router_losses() -> {"router_loss": added to the training
                                          loss, other entries: logged beside it}; {} when absent

"Declared" means an attribute of the model (model.n_layer) or of its `config` (an object or a dict), the
names GPT uses: vocab_size, seq_len, n_layer, d_model, n_head, activation_checkpointing.

Training builds the model from the `model` config node (`model=custom model._target_=my_pkg.MyLM` passes
vocab_size and seq_len). Export, generate, distillation teachers and sharded init_from rebuild it from the
config.yaml saved beside its weights, with plain values only, and only for exp's own classes and the packages
the user allows (--allow-target my_pkg. on the CLIs, EXP_ALLOWED_TARGETS=my_pkg.: exp.checkpoint.weights).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def inner(model: nn.Module) -> nn.Module:
    """The plain module under any DDP/DataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def declared(model: nn.Module, name: str):
    """The model's `name` attribute, else its config's (object or dict); None when neither has it."""
    model = inner(model)
    value = getattr(model, name, None)
    if value is None:
        config = getattr(model, "config", None)
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return None if isinstance(value, (nn.Module, torch.Tensor)) else value


def logits_of(output) -> torch.Tensor:
    """The logits (B, T, vocab) in what a model's forward returned (see the module docstring)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    found = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    raise TypeError(
        f"the model's forward returned {type(output).__name__}: it must return the logits (B, T, vocab), "
        "a tuple whose first item is the logits, or an object with a `logits` field"
    )


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameter count, shared (tied) weights once; exclude_embeddings leaves out the token embeddings."""
    model = inner(model)
    if hasattr(model, "num_params"):
        return model.num_params(exclude_embeddings=True) if exclude_embeddings else model.num_params()
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    if exclude_embeddings:
        embeddings = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
        n -= sum(w.numel() for w in embeddings.values())
    return n


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token at sequence length seq_len (forward and backward)."""
    model = inner(model)
    if hasattr(model, "flops_per_token"):
        return model.flops_per_token(seq_len)
    n_layer, d_model = declared(model, "n_layer"), declared(model, "d_model")
    attention = 12 * n_layer * d_model * seq_len if n_layer and d_model else 0
    return 6 * num_params(model) + attention


def model_spec(model: nn.Module) -> tuple[int | None, int | None]:
    """(vocab_size, seq_len): declared, else vocab_size from a one-token forward (None if that fails) and
    seq_len None (no known limit)."""
    vocab_size, seq_len = declared(model, "vocab_size"), declared(model, "seq_len")
    if vocab_size is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        try:
            with torch.no_grad():
                vocab_size = int(logits_of(model(torch.zeros(1, 1, dtype=torch.long, device=device))).shape[-1])
        except Exception:  # a model that cannot run one token on its own (needs more inputs): unknown
            vocab_size = None
    return vocab_size, seq_len


def takes_documents(model: nn.Module | type) -> bool:
    """Whether the model's (or model class's) forward declares a `doc_ids` keyword (document masking)."""
    forward = (model if isinstance(model, type) else type(inner(model))).forward
    try:
        return "doc_ids" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def router_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Auxiliary losses of the last forward (a mixture of experts' router): model.router_losses() or {}."""
    model = inner(model)
    return model.router_losses() if hasattr(model, "router_losses") else {}


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
    """idx (B, T) with up to max_new_tokens sampled tokens appended: model.generate(idx, max_new_tokens,
    **options), else `sample`. options: temperature, top_k, generator, stop_token_ids, vocab_limit (see
    `sample`); a model's own generate that takes no vocab_limit is not given one."""
    if hasattr(model, "generate"):
        params = inspect.signature(model.generate).parameters.values()
        if not any(p.name == "vocab_limit" or p.kind is p.VAR_KEYWORD for p in params):
            options.pop("vocab_limit", None)
        return model.generate(idx, max_new_tokens, **options)
    return sample(model, idx, max_new_tokens, seq_len=declared(model, "seq_len"), **options)


@torch.no_grad()
def sample(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_token_ids: Iterable[int] | None = None,
    seq_len: int | None = None,
    vocab_limit: int | None = None,
    step=None,
) -> torch.Tensor:
    """Append up to max_new_tokens sampled tokens to idx (B, T); temperature 0 means greedy decoding.

    step(ids, new) -> (B, vocab): the next token's logits for the ids so far, of which the last `new` are new since
    the previous call (a model with a key/value cache runs over those only: exp.model.GPT.generate); without it,
    each step runs the model over the last seq_len tokens.

    vocab_limit: ids at or above it are never drawn (the padding rows of an embedding larger than the
    tokenizer).
    Each step runs forward over the last seq_len tokens (all of them when seq_len is None). A row that
    emits one of stop_token_ids is finished: the stop token stays in it and its later positions repeat it.
    Generation ends early once every row is finished (for B=1: right after the stop token), so the result
    can be shorter than T + max_new_tokens.
    """
    stops = torch.tensor(sorted(set(stop_token_ids or ())), dtype=idx.dtype, device=idx.device)
    done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
    if step is None:

        def step(ids: torch.Tensor, new: int) -> torch.Tensor:
            return logits_of(model(ids if seq_len is None else ids[:, -seq_len:]))[:, -1, :]

    was_training = model.training
    model.eval()  # sampling with dropout active is never intended
    new = idx.size(1)
    try:
        for _ in range(max_new_tokens):
            logits = step(idx, new).float()  # (B, vocab)
            new = 1
            if vocab_limit is not None and vocab_limit < logits.size(-1):
                logits[:, vocab_limit:] = float("-inf")
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            if stops.numel():
                nxt = torch.where(done, idx[:, -1:], nxt)  # a finished row repeats its stop token
                done |= torch.isin(nxt, stops)
            idx = torch.cat((idx, nxt), dim=1)
            if stops.numel() and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return idx
