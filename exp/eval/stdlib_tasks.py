"""exp's built-in evaluation tasks, made from this interpreter's standard library: no download, on every machine.

- `exp_stdlib_mc` (multiple choice, 4 choices, chance 0.25): a small function's `def` line, and four bodies to
  continue it with: its own and three from other functions of similar length. acc and acc_norm (the harness's
  length-normalised accuracy). The functions come from the whole standard library, which the default data
  (`data=pystdlib`) trains on: the score says how well the model has learnt Python as that corpus writes it,
  not how it does on code it never saw.
- `exp_stdlib_ppl` (rolling log-likelihood): the files `data=pystdlib` holds out for validation, in pieces of at
  most PIECE_BYTES; word and byte perplexity and bits per byte, as the harness's wikitext task reports them.

The task YAMLs beside this module (exp/eval/tasks/) name the functions below as their `custom_dataset`; the
examples are the same on every run of the same Python (sorted files, a fixed seed).
"""

from __future__ import annotations

import ast
import random
import textwrap
import warnings
from functools import lru_cache

from exp.data.corpus import split_value, stdlib_root, stdlib_sources

NUM_CHOICES = 4
CHANCE = 1 / NUM_CHOICES
MAX_DEF_BYTES = 120  # the whole function, dedented: fits gpt_tiny's 128-token context with room for the `def` line
MIN_BODY_BYTES = 24
NUM_EXAMPLES = 500
PIECE_BYTES = 1024
VAL_FRACTION = 0.005  # data=pystdlib's default: the files it holds out for validation
SEED = 1234


def _functions(source: str) -> list[tuple[str, str]]:
    """(def line, body) of the short, plain functions in a module's source, dedented to the top level."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out, lines = [], source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.decorator_list or node.end_lineno is None:
            continue
        if node.body[0].lineno == node.lineno or node.end_lineno - node.lineno > 8:  # one line, or long
            continue
        code = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
        head, _, body = code.partition("\n")
        if not head.startswith("def ") or not head.endswith(":") or '"""' in body or "'''" in body:
            continue
        if MIN_BODY_BYTES <= len(body.encode()) and len(code.encode()) <= MAX_DEF_BYTES and body.strip():
            out.append((head + "\n", body.rstrip("\n") + "\n"))
    return out


@lru_cache(maxsize=1)
def multiple_choice_docs() -> tuple[dict, ...]:
    """The exp_stdlib_mc examples: {"context", "choices", "label", "source"}."""
    root = stdlib_root()
    sources = stdlib_sources(root)
    random.Random(SEED).shuffle(sources)
    found = []
    for path in sources:  # files in a fixed random order, until there are enough functions to choose from
        name = path.relative_to(root).as_posix()
        found.extend((name, head, body) for head, body in _functions(path.read_text("utf-8", errors="replace")))
        if len(found) >= 3 * NUM_EXAMPLES:
            break
    bodies = sorted({body for _, _, body in found}, key=lambda b: (len(b), b))
    rng = random.Random(SEED)
    rng.shuffle(found)
    docs, seen = [], set()
    for name, head, body in found:
        if (head, body) in seen:
            continue
        seen.add((head, body))
        others = _similar(bodies, body, rng)
        if len(others) < NUM_CHOICES - 1:
            continue
        label = rng.randrange(NUM_CHOICES)
        choices = others[:label] + [body] + others[label:]
        docs.append({"context": head, "choices": choices, "label": label, "source": name})
        if len(docs) == NUM_EXAMPLES:
            break
    return tuple(docs)


def _similar(bodies: list[str], body: str, rng: random.Random) -> list[str]:
    """Three other bodies near this one in length (so length alone does not give the answer away)."""
    i = bodies.index(body)
    near = [b for b in bodies[max(0, i - 12) : i + 13] if b != body]
    return rng.sample(near, NUM_CHOICES - 1) if len(near) >= NUM_CHOICES - 1 else []


@lru_cache(maxsize=1)
def held_out_docs() -> tuple[dict, ...]:
    """The exp_stdlib_ppl documents: the validation files of data=pystdlib, cut at line ends into pieces."""
    root = stdlib_root()
    docs = []
    for path in stdlib_sources(root):
        name = path.relative_to(root).as_posix()
        if split_value(name) >= VAL_FRACTION:
            continue
        piece = ""
        for line in path.read_text("utf-8", errors="replace").splitlines(keepends=True):
            if piece and len((piece + line).encode()) > PIECE_BYTES:
                docs.append({"text": piece, "source": name})
                piece = ""
            piece += line
        if piece.strip():
            docs.append({"text": piece, "source": name})
    return tuple(docs)


def multiple_choice(**kwargs):
    """custom_dataset of exp_stdlib_mc: a DatasetDict with one split, "test"."""
    return _dataset(multiple_choice_docs())


def held_out(**kwargs):
    """custom_dataset of exp_stdlib_ppl."""
    return _dataset(held_out_docs())


def _dataset(docs):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(list(docs))})
