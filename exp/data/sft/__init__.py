"""Supervised fine-tuning data: conversations as (x, y) batches whose labels are the assistant's tokens only.

template (chat template and labels) -> formats (record formats) -> sources (JSONL, hf:) -> examples
(truncation, packing, batches, the sampler) -> datasets (the data group targets). stdlib builds the
default set of stdlib function pairs. The names below are the ones configs and user code import.
"""

from .datasets import SFTData, SFTJsonl, SFTPyStdlib
from .examples import Examples, ExampleSampler, fit_examples, make_batch, pack_rows
from .formats import FORMATS, detect_format, parse_record
from .sources import SFTDataError, load_conversations, read_hf, read_jsonl, read_records
from .stdlib import function_pairs, pystdlib_sft
from .template import END, ROLE_IDS, Turn, encode_arrays, encode_chat

__all__ = [
    "END",
    "FORMATS",
    "ROLE_IDS",
    "ExampleSampler",
    "Examples",
    "SFTData",
    "SFTDataError",
    "SFTJsonl",
    "SFTPyStdlib",
    "Turn",
    "detect_format",
    "encode_arrays",
    "encode_chat",
    "fit_examples",
    "function_pairs",
    "load_conversations",
    "make_batch",
    "pack_rows",
    "parse_record",
    "pystdlib_sft",
    "read_hf",
    "read_jsonl",
    "read_records",
]
