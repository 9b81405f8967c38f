"""Hugging Face datasets as a data source (`hf:...`), shared by prepare and SFT; needs `pip install -e '.[hf]'`.

A source names one of:

    hf:NAME[:CONFIG]           a hub dataset (downloaded into the Hugging Face cache), or a local dataset folder
                               that `datasets.load_dataset` reads (data files, or a README declaring configs)
    hf:DIR                     a folder written by DatasetDict.save_to_disk (the split picks one), or by
                               Dataset.save_to_disk (one split, read whole whatever the split asked)
    hf:json:FILES              local files through a packaged builder: json (also JSONL), parquet, csv, text or
                               arrow; FILES is a path or glob, several joined by commas

Records come out one at a time (streamed from the hub with `streaming`), so a corpus never has to fit in memory.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import DataError

INSTALL_HINT = "pip install -e '.[hf]'"
PACKAGED = ("json", "parquet", "csv", "text", "arrow")  # builders that read local files: hf:json:FILES
READ_BATCH = 1000  # records fetched from Arrow at a time (rows one by one are several times slower)


class HFSourceError(DataError):
    """An hf: source that cannot be read: the message starts with the source."""


class MissingDatasets(HFSourceError):
    """`datasets` is not installed; the message names the extra that brings it."""


@dataclass(frozen=True)
class HFSource:
    """A parsed `hf:` source: how it is loaded (hub, disk or a packaged builder) and what from."""

    text: str  # as given, hf: prefix included
    kind: str  # "hub" (load_dataset by name or folder), "disk" (load_from_disk) or "files" (packaged builder)
    path: str  # name, folder, or the builder ("json", ...)
    config: str | None = None  # hub config name
    data_files: tuple[str, ...] = ()  # kind "files": the paths or globs


def is_hf(source: str) -> bool:
    """True for a source string that names a Hugging Face dataset."""
    return str(source).startswith("hf:")


def _saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def parse_source(source: str) -> HFSource:
    """The HFSource that `hf:...` names (see the module docstring); HFSourceError for an empty name or no files."""
    if not is_hf(source):
        raise HFSourceError(f"{source}: not an hf: source")
    rest = source[3:]
    head, sep, tail = rest.partition(":")
    if head in PACKAGED and sep:
        files = tuple(f for f in tail.split(",") if f)
        if not files:
            raise HFSourceError(f"{source}: name the files, e.g. hf:{head}:data/*.{head}")
        for f in files:
            if not glob.glob(str(Path(f).expanduser())):
                raise HFSourceError(f"{source}: no file matches {f}")
        return HFSource(source, "files", head, data_files=tuple(str(Path(f).expanduser()) for f in files))
    if not rest:
        raise HFSourceError(f"{source}: name a dataset, e.g. hf:org/name[:config]")
    if Path(rest).expanduser().is_dir() and _saved_to_disk(Path(rest).expanduser()):
        return HFSource(source, "disk", str(Path(rest).expanduser()))
    if not head:
        raise HFSourceError(f"{source}: name a dataset, e.g. hf:org/name[:config]")
    return HFSource(source, "hub", head, config=tail or None)


def datasets_module(source: str = "hf:") -> Any:
    """The `datasets` package, or MissingDatasets naming the source and the extra."""
    try:
        import datasets
    except ImportError:
        raise MissingDatasets(
            f"{source} needs the Hugging Face `datasets` package, which is not installed ({INSTALL_HINT})"
        ) from None
    return datasets


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (datasets spreads some, such as the configs to pick from, over several)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load(source: str | HFSource, split: str = "train", *, streaming: bool = False, cache_dir: str | None = None) -> Any:
    """The split of the source as a datasets Dataset (memory-mapped Arrow) or IterableDataset (streaming);
    what load_dataset downloads and converts goes to cache_dir (default: the Hugging Face cache).

    HFSourceError, one line led by the source, for a config, split or dataset that does not exist.
    """
    src = parse_source(source) if isinstance(source, str) else source
    ds_mod = datasets_module(src.text)
    if src.kind == "disk":
        try:
            saved = ds_mod.load_from_disk(src.path)
        except Exception as e:  # a folder save_to_disk did not finish, or from another datasets version
            raise HFSourceError(f"{src.text}: cannot load it ({_one_line(e)})") from None
        if isinstance(saved, ds_mod.DatasetDict):
            if split not in saved:
                raise HFSourceError(f"{src.text}: no split {split!r} (it has: {', '.join(saved)})")
            saved = saved[split]
        return saved.to_iterable_dataset() if streaming else saved
    try:
        if src.kind == "files":
            files = list(src.data_files)
            return ds_mod.load_dataset(
                src.path, data_files=files, split=split, streaming=streaming, cache_dir=cache_dir
            )
        return ds_mod.load_dataset(src.path, src.config, split=split, streaming=streaming, cache_dir=cache_dir)
    except Exception as e:  # datasets raises ValueError, FileNotFoundError, ConnectionError, its own errors
        msg = _one_line(e)
        if "split" in msg.lower():
            msg = f"no split {split!r} ({msg})"
        elif "config" in msg.lower() and src.config is not None:
            msg = f"no config {src.config!r} ({msg})"
        raise HFSourceError(f"{src.text}: {msg}") from None


def column_names(ds: Any) -> list[str] | None:
    """The dataset's columns, or None when a stream does not know them before its first record."""
    names = getattr(ds, "column_names", None)
    return list(names) if names is not None else None


def _batches(ds: Any, where: str) -> Iterator[dict]:
    """ds.iter(READ_BATCH), a failure to read (a malformed file, a lost connection) as one HFSourceError line."""
    it = iter(ds.iter(batch_size=READ_BATCH))
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise HFSourceError(f"{where}: cannot read it ({_one_line(e)})") from None
        yield batch


def records(source: str, split: str = "train", *, streaming: bool = False) -> Iterator[tuple[str, dict]]:
    """(`hf:...[split]:row`, record) per row of the source's split."""
    ds = load(source, split, streaming=streaming)
    for i, record in enumerate(ds):
        yield f"{source}[{split}]:{i}", dict(record)


def texts(
    source: str, split: str, field: str, *, streaming: bool = False, cache_dir: str | None = None
) -> Iterator[tuple[str, str]]:
    """(`hf:...[split]:row`, text) of one string field per row.

    HFSourceError for a field the dataset lacks (checked before the first row where the columns are known)
    or a row whose field is not a string.
    """
    ds = load(source, split, streaming=streaming, cache_dir=cache_dir)
    columns = column_names(ds)
    if columns is not None and field not in columns:
        raise HFSourceError(f"{source}: no field {field!r} (it has: {', '.join(columns)}); set --text-field")
    row = 0
    for batch in _batches(ds, f"{source}[{split}]"):
        if field not in batch:
            raise HFSourceError(f"{source}[{split}]:{row}: no field {field!r} (it has: {', '.join(batch)})")
        for text in batch[field]:
            if not isinstance(text, str):
                raise HFSourceError(f"{source}[{split}]:{row}: field {field!r} is {type(text).__name__}, not a string")
            yield f"{source}[{split}]:{row}", text
            row += 1
