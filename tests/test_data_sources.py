"""jaxrlhf.data.sources.load_rows: local files/dirs, tfds (faked), Hub errors.

References: rows written by the test itself (json / pandas) or re-read with gzip+json.
"""
import gzip
import json
import sys
import types

import datasets
import numpy as np
import pandas as pd
import pytest

from jaxrlhf.data import sources as S

ROWS = [{"prompt": f"p{i}", "response": f"r{i}", "score": i} for i in range(5)]


def _write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.jsonl.gz", "d.json.gz", "d.parquet", "d.csv"])
def test_local_file_types(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        pd.DataFrame(ROWS).to_parquet(path)
    elif name.endswith(".csv"):
        pd.DataFrame(ROWS).to_csv(path, index=False)
    else:
        _write_jsonl(path, ROWS, gz=name.endswith(".gz"))
    ds = S.load_rows(str(path))
    assert isinstance(ds, datasets.Dataset)
    assert [dict(r) for r in ds] == ROWS


def test_local_directory_picks_split(shared_assets):
    folder = shared_assets / "imdb-reviews-subset"
    with gzip.open(folder / "test.jsonl.gz", "rt") as f:
        first = json.loads(f.readline())
    ds = S.load_rows(folder, split="test")
    assert len(ds) == 2500 and ds[0]["id"] == first["id"]
    assert all(i.startswith("test/") for i in ds["id"][:50])
    assert S.load_rows(folder, split="train")[0]["id"].startswith("train/")


def test_directory_data_files_and_streaming(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    _write_jsonl(tmp_path / "b.jsonl", ROWS[2:])
    ds = S.load_rows(tmp_path)  # no file named by split: all files
    assert sorted(r["prompt"] for r in ds) == [r["prompt"] for r in ROWS]
    assert [r["prompt"] for r in S.load_rows(tmp_path, data_files=["b.jsonl"])] == ["p2", "p3", "p4"]
    stream = S.load_rows(tmp_path / "a.jsonl", streaming=True)
    assert [r["prompt"] for r in stream] == ["p0", "p1"]
    assert len(S.load_rows("json", data_files=str(tmp_path / "a.jsonl"))) == 2


def test_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl.gz"
    with pytest.raises(FileNotFoundError, match="nope/train.jsonl.gz"):
        S.load_rows(str(missing))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        S.load_rows("./no_such_dir")


def test_hub_unreachable_gives_one_clear_error(monkeypatch):
    def boom(*a, **k):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", boom)  # sources imports `datasets` where it loads
    with pytest.raises(S.DatasetFetchError, match=r"'org/some-dataset'.*could not be fetched.*local file"):
        S.load_rows("org/some-dataset", split="train")


def test_hub_offline_real_call():
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("only run in offline mode (no network retries)")
    with pytest.raises(S.DatasetFetchError, match="could not be fetched"):
        S.load_rows("Anthropic/hh-rlhf", split="test")


def test_tfds_missing_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes `import` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'jaxrlhf\[tfds\]'"):
        S.load_rows("tfds:imdb_reviews", split="train")


def test_tfds_records_converted(monkeypatch):
    calls = {}

    def data_source(name, split, builder_kwargs):
        calls.update(name=name, split=split, builder_kwargs=builder_kwargs)
        return [
            {"text": b"great movie", "label": np.int64(1), "tags": np.array([b"a", b"b"])},
            {"text": b"bad", "label": np.int64(0), "tags": np.array([b"c", b"d"])},
        ]

    fake = types.ModuleType("tensorflow_datasets")
    fake.data_source = data_source
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    ds = S.load_rows("tfds:imdb_reviews/plain_text", split="test")
    assert calls == {"name": "imdb_reviews/plain_text", "split": "test", "builder_kwargs": {"file_format": "array_record"}}
    assert isinstance(ds, datasets.Dataset)
    assert [dict(r) for r in ds] == [
        {"text": "great movie", "label": 1, "tags": ["a", "b"]},
        {"text": "bad", "label": 0, "tags": ["c", "d"]},
    ]
    S.load_rows("tfds:imdb_reviews", split="train", config_name="plain_text")
    assert calls["name"] == "imdb_reviews/plain_text"
