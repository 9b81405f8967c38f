"""The `data` group: every target follows exp.data.DataSource (protocol.py).

tokens        TokenData, PyStdlib (the default), Memmap: token files read as random windows
torch_dataset TorchDataset: your own map-style torch Dataset of token sequences
mixture       Mixture: several token sources drawn by weight, validated one by one
sft/          SFTJsonl, SFTPyStdlib: conversations with labels on the assistant's tokens
corpus, cache the token-file writer and the cached stdlib corpus; prepare (CLI) writes token files
Configs name the targets by the short paths below (exp.data.PyStdlib, exp.data.sft.SFTJsonl).
"""

from .mixture import Mixture
from .protocol import Batch, DataError, DataSource, TrainSampler, check_data_source, document_token
from .tokenizer import EOT, PAD, VOCAB_SIZE, ByteTokenizer
from .tokens import Memmap, PyStdlib, TokenData, max_token_id
from .torch_dataset import TorchDataset

__all__ = [
    "EOT",
    "PAD",
    "VOCAB_SIZE",
    "Batch",
    "ByteTokenizer",
    "DataError",
    "DataSource",
    "Memmap",
    "Mixture",
    "PyStdlib",
    "TokenData",
    "TorchDataset",
    "TrainSampler",
    "check_data_source",
    "document_token",
    "max_token_id",
]
