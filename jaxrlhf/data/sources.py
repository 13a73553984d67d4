"""Where rows come from: local files, TensorFlow Datasets, or the Hugging Face Hub.

Everything returns a :class:`datasets.Dataset` (or a :class:`datasets.IterableDataset` when
``streaming=True``) whose rows are plain dicts; :mod:`jaxrlhf.data.formats` turns rows into canonical
examples. Nothing here needs network access when given a local path.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from jaxrlhf.errors import DataError, DataFileNotFoundError, JaxrlhfError

if TYPE_CHECKING:  # `datasets` is imported where rows are loaded, so `import jaxrlhf.data` stays light
    import datasets

__all__ = ["DatasetFetchError", "load_rows", "LOCAL_SUFFIXES"]

# suffix -> datasets builder name (longest suffixes first so ".jsonl.gz" wins over ".gz")
LOCAL_SUFFIXES: dict[str, str] = {
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_BUILDERS = ("json", "parquet", "csv")
_TFDS_PREFIX = "tfds:"


class DatasetFetchError(JaxrlhfError, ConnectionError):
    """A remote (Hub) dataset could not be fetched: offline, unreachable, or not found."""

    kind = "data"


def _suffix_builder(path: str) -> str | None:
    low = path.lower()
    for suffix, builder in LOCAL_SUFFIXES.items():
        if low.endswith(suffix):
            return builder
    return None


def _looks_like_path(source: str) -> bool:
    return (
        _suffix_builder(source) is not None
        or source.startswith(("/", "./", "../", "~", ".\\"))
        or os.path.isabs(source)
    )


def _files_in_dir(directory: str, split: str) -> tuple[str, list[str]]:
    """Data files of one builder type in ``directory`` (recursive), preferring those named by ``split``."""
    found: list[str] = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if _suffix_builder(name) is not None:
                found.append(os.path.join(root, name))
    found.sort()
    if not found:
        raise DataFileNotFoundError(
            f"directory {directory!r} holds no data files; expected one of {sorted(LOCAL_SUFFIXES)}"
        )
    # files whose name (or parent folder) starts with the split name, e.g. train.jsonl.gz, train-0001.parquet
    by_split = [
        f for f in found
        if os.path.basename(f).lower().startswith(split.lower())
        or os.path.basename(os.path.dirname(f)).lower() == split.lower()
    ]
    chosen = by_split or found
    builders = {_suffix_builder(f) for f in chosen}
    if len(builders) != 1:
        raise DataError(
            f"directory {directory!r} mixes file types {sorted(builders)} for split {split!r}; "
            "pass data_files=[...] with files of one type"
        )
    return builders.pop(), chosen


def _load_local(source: str, split: str, data_files: Any, streaming: bool) -> datasets.Dataset:
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise DataFileNotFoundError(f"local data path {path!r} does not exist; check data.source (or the "
                                    "working directory it is relative to)")
    if os.path.isdir(path):
        if data_files is not None:
            files = [data_files] if isinstance(data_files, str) else list(data_files)
            files = [f if os.path.isabs(f) else os.path.join(path, f) for f in files]
            for f in files:
                if not os.path.exists(f):
                    raise DataFileNotFoundError(f"local data path {f!r} does not exist")
            builders = {_suffix_builder(f) for f in files}
            if len(builders) != 1 or None in builders:
                raise DataError(f"data_files {files} must all be one of {sorted(LOCAL_SUFFIXES)}")
            builder = builders.pop()
        else:
            builder, files = _files_in_dir(path, split)
    else:
        builder = _suffix_builder(path)
        if builder is None:
            raise DataError(
                f"unknown file type for {path!r}; expected a name ending in one of {sorted(LOCAL_SUFFIXES)} "
                "(convert it, or rename it if it already is one)"
            )
        files = [path]
    # The split name is only a label for local files.
    import datasets

    for f in files:  # cheap: an empty file reads as a bare StopIteration or "corresponds to no data"
        if os.path.getsize(f) == 0:
            raise DataError(f"data file {f!r} is empty; give a file with at least one row")
    builder_log = logging.getLogger("datasets.packaged_modules")  # logs the parse error it raises again
    level = builder_log.level
    builder_log.setLevel(logging.CRITICAL)
    try:
        rows = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 -- re-checked below; an error we cannot explain is re-raised
        for f in files:
            problem = _check_local_file(f, builder)
            if problem is not None:
                raise problem from e
        raise
    finally:
        builder_log.setLevel(level)
    if not streaming and len(rows) == 0:
        raise DataError(f"{path!r} holds no rows; give a file with at least one row")
    return rows


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.lower().endswith(".gz") else open(path, encoding="utf-8")


def _check_local_file(path: str, builder: str | None = None) -> DataError | None:
    """Why a local data file cannot be read, as a :class:`~jaxrlhf.errors.DataError` naming the file and
    the line (None when no problem is found). Called only after ``datasets`` failed to read the file.

    JSON files (``.json``/``.jsonl``, optionally ``.gz``): a whole-file JSON document (a list of rows, or
    a dict) is fine; otherwise every non-blank line must be one JSON object (JSON Lines). Any file: not
    UTF-8 text, or no rows at all (empty, blank lines, a CSV header only).
    """
    builder = builder or _suffix_builder(path)
    if builder == "parquet":
        return None
    try:
        with _open_text(path) as fh:
            text = fh.read()
    except (UnicodeDecodeError, OSError, EOFError) as e:
        return DataError(f"data file {path!r} cannot be read as UTF-8 text ({type(e).__name__}: {e})")
    lines = text.splitlines()
    if builder == "csv":
        if sum(1 for ln in lines if ln.strip()) <= 1:
            return DataError(f"data file {path!r} holds no rows (a header line at most); add rows")
        return None
    if not text.strip():
        return DataError(f"data file {path!r} holds no rows (it is empty or blank); give a file with at least one row")
    try:
        json.loads(text)
        return None  # one JSON document: datasets failed for another reason
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}): "
                             f"{line.strip()[:80]!r}; fix or delete that line (JSON Lines: one object per line)")
        if not isinstance(value, dict):
            return DataError(f"{path}, line {number}: a JSON {type(value).__name__}, not an object; "
                             "JSON Lines rows must be objects {\"field\": value, ...}")
    return None


def _tfds_record_to_python(value: Any) -> Any:
    """numpy scalars/arrays and bytes from TFDS -> plain Python (str for bytes)."""
    import numpy as np

    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in ("S", "O"):
            return [_tfds_record_to_python(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _tfds_record_to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tfds_record_to_python(v) for v in value]
    return value


def _load_tfds(spec: str, split: str, config_name: str | None) -> datasets.Dataset:
    name = spec[len(_TFDS_PREFIX):].strip()
    if not name:
        raise DataError("tfds source needs a name: 'tfds:NAME' or 'tfds:NAME/CONFIG'")
    if config_name and "/" not in name:
        name = f"{name}/{config_name}"
    try:
        import tensorflow_datasets as tfds  # optional extra
    except ImportError as e:
        raise ImportError(
            f"loading {spec!r} needs tensorflow-datasets, which is not installed; "
            "install it with `pip install 'jaxrlhf[tfds]'` or pass a local .jsonl/.parquet/.csv file instead"
        ) from e
    source = tfds.data_source(name, split=split, builder_kwargs={"file_format": "array_record"})
    records = [_tfds_record_to_python(source[i]) for i in range(len(source))]
    import datasets

    return datasets.Dataset.from_list(records)


def load_rows(
    source: str | os.PathLike,
    *,
    split: str = "train",
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
    config_name: str | None = None,
    streaming: bool = False,
) -> datasets.Dataset:
    """Load raw rows (dicts) from a local file/directory, TensorFlow Datasets, or the Hub.

    Args:
      source: one of
        * a local file ending in ``.json``, ``.jsonl``, ``.json.gz``, ``.jsonl.gz``, ``.parquet`` or
          ``.csv``, or a directory of such files (recursively; files whose name starts with ``split``
          are preferred, e.g. ``train.jsonl.gz`` for ``split="train"``; ``data_files`` selects files
          relative to the directory);
        * ``"json"``, ``"parquet"`` or ``"csv"`` together with ``data_files`` (passed to
          ``datasets.load_dataset`` as is);
        * ``"tfds:NAME"`` or ``"tfds:NAME/CONFIG"``: read with
          ``tfds.data_source(NAME, split=split, builder_kwargs={"file_format": "array_record"})`` and
          converted to a ``datasets.Dataset`` (bytes decoded to str, numpy to Python);
        * anything else is a Hub dataset id: ``datasets.load_dataset(source, config_name, split=split)``.
      split: split name (for local files it only labels the split).
      data_files: see above.
      config_name: Hub config (or TFDS config when the source has none).
      streaming: return a ``datasets.IterableDataset`` (local and Hub sources only).

    Returns:
      ``datasets.Dataset`` of rows (``IterableDataset`` when streaming).

    Raises:
      DataFileNotFoundError: (a FileNotFoundError) a local path (or a name that looks like one) does not
        exist.
      DataError: (a ValueError) unknown or mixed file types; an empty file or one with no rows; a JSON
        Lines file with a line that is not a JSON object (the message gives ``file:line``).
      ImportError: a ``tfds:`` source without ``tensorflow_datasets`` installed
        (``pip install 'jaxrlhf[tfds]'``).
      DatasetFetchError: (a ``ConnectionError``) a Hub dataset could not be fetched (offline,
        unreachable or unknown id); the message says how to pass a local file instead.
    """
    import datasets

    source = os.fspath(source)
    if source.startswith(_TFDS_PREFIX):
        if streaming:
            raise ValueError("streaming=True is not supported for tfds: sources")
        return _load_tfds(source, split, config_name)
    if source in _BUILDERS and data_files is not None:
        return datasets.load_dataset(source, data_files=data_files, split=split, streaming=streaming)
    if os.path.exists(os.path.expanduser(source)) or _looks_like_path(source):
        return _load_local(source, split, data_files, streaming)
    try:
        return datasets.load_dataset(
            source, config_name, split=split, data_files=data_files, streaming=streaming
        )
    except (OSError, ConnectionError) as e:  # offline, unreachable, DatasetNotFoundError, ...
        raise DatasetFetchError(
            f"dataset {source!r} (config={config_name!r}, split={split!r}) could not be fetched from the "
            f"Hugging Face Hub ({type(e).__name__}: {e}). If you are offline, download it elsewhere and pass "
            "a local file or directory instead, e.g. load_rows('/path/to/train.jsonl.gz') "
            "(.json/.jsonl[.gz]/.parquet/.csv)."
        ) from e
