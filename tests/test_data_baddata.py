"""Bad data is skipped and counted, never a crash mid-run; a manifest naming a missing shard fails at start."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pretrain.data import DataConfig, SourceConfig, build_stream, make_sample_corpus
from pretrain.data.batch import BadDataWarning
from pretrain.data.schema import write_shard


def _corpus(tmp_path):
    url = make_sample_corpus(
        str(tmp_path), num=120, size=32, seed=1, num_val=0, shard_rows=40, row_group_rows=20
    )
    return url, [str(tmp_path / "train" / f"shard-0000{i}.parquet") for i in range(3)]


def _cfg(url, **kw):
    return DataConfig(sources=[SourceConfig("s", url)], image_size=16, batch_size=20, num_workers=1, **kw)


def _rewrite(path, mutate):
    cols = pq.read_table(path).to_pydict()
    mutate(cols)
    write_shard(path, cols, row_group_rows=20)


def test_corrupt_and_truncated_images_are_counted(tmp_path):
    url, shards = _corpus(tmp_path)

    def damage(cols):
        cols["image"][3] = b"\xff\xd8 definitely not a jpeg"
        cols["image"][7] = cols["image"][7][: len(cols["image"][7]) // 2]  # truncated mid-scan
        cols["image"][9] = b""

    _rewrite(shards[0], damage)
    stream = build_stream(_cfg(url), rank=0, world_size=1, seed=0)
    with pytest.warns(BadDataWarning) as caught:
        keys = [k for b in stream for k, ok in zip(b["key"], b["valid"].tolist()) if ok]
    assert stream.counters()["bad_image"] == 3 and stream.counters()["samples"] == 117 == len(set(keys))
    msgs = " ".join(str(w.message) for w in caught)
    assert "sample-train-0000003" in msgs and "shard-00000.parquet" in msgs
    assert "sample-train-0000003" not in keys


def test_missing_shard_fails_at_start_with_the_fix(tmp_path):
    url, shards = _corpus(tmp_path)
    os.remove(shards[1])
    with pytest.raises(FileNotFoundError, match=r"shard-00001\.parquet.*pretrain data build"):
        build_stream(_cfg(url), rank=0, world_size=1, seed=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_stream(_cfg(str(tmp_path / "nope" / "manifest.json")), rank=0, world_size=1, seed=0)


def test_shard_lost_mid_run_and_mismatched_shard_are_skipped(tmp_path):
    url, shards = _corpus(tmp_path)
    stream = build_stream(_cfg(url, shuffle=False), rank=0, world_size=1, seed=0)
    os.remove(shards[2])  # after the start check: disappears mid-run
    _rewrite(
        shards[1], lambda cols: [v.__delitem__(slice(30, None)) for v in cols.values()]
    )  # 30 rows, not 40
    with pytest.warns(BadDataWarning) as caught:
        got = [b for b in stream]
    msgs = [str(w.message) for w in caught]
    assert any("shard-00001.parquet does not match its manifest" in m for m in msgs)
    assert any("shard-00002.parquet is missing" in m for m in msgs) and len(msgs) == 2  # one per shard
    c = stream.counters()
    assert c["missing_shard"] == 40 and c["shard_mismatch"] == 40 and c["samples"] == 40
    assert all(b["image"].shape == (20, 3, 16, 16) for b in got)  # fixed batch size throughout


def test_empty_shard_file_is_skipped(tmp_path):
    url, shards = _corpus(tmp_path)
    open(shards[0], "wb").close()
    stream = build_stream(_cfg(url), rank=0, world_size=1, seed=0)
    with pytest.warns(BadDataWarning, match="unreadable"):
        n = sum(int(b["valid"].sum()) for b in stream)
    assert n == 80 and stream.counters()["shard_mismatch"] == 40


def _retype(path, column, values, type_):
    """Rewrite a shard with one read column replaced by `values` of arrow type `type_` (row groups kept)."""
    import pyarrow as pa

    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index(column), pa.field(column, type_), pa.array(values, type_))
    pq.write_table(t, path, row_group_size=20)


@pytest.mark.parametrize(
    "column,make,type_name",
    [
        ("label", lambda n: [f"class{i % 3}" for i in range(n)], "string"),  # class names, not indices
        ("label", lambda n: [float("nan") if i % 2 else 1.0 for i in range(n)], "double"),
        ("key", lambda n: list(range(n)), "int64"),
        ("caption", lambda n: [b"a caption"] * n, "binary"),
    ],
)
def test_wrong_column_type_makes_the_shard_padding(tmp_path, column, make, type_name):
    import pyarrow as pa

    url, shards = _corpus(tmp_path)
    _retype(shards[1], column, make(40), pa.type_for_alias(type_name))
    stream = build_stream(_cfg(url, shuffle=False), rank=0, world_size=1, seed=0)
    with pytest.warns(BadDataWarning) as caught:
        batches = list(stream)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "shard-00001.parquet" in msgs[0] and f"{column}: {type_name}" in msgs[0], msgs
    c = stream.counters()
    assert c["shard_mismatch"] == 40 and c["samples"] == 80
    keys = [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok]
    assert len(keys) == 80 and not any(
        40 <= int(k.rsplit("-", 1)[1]) < 80 for k in keys
    )  # none of shard 1's rows delivered


def test_unreadable_row_group_is_warned_and_counted(tmp_path):
    url, shards = _corpus(tmp_path)
    md = pq.ParquetFile(shards[0]).metadata
    col = md.row_group(1).column(md.schema.to_arrow_schema().get_field_index("key"))
    start = col.dictionary_page_offset or col.data_page_offset
    with open(shards[0], "r+b") as f:  # garbage over row group 1's first page header: the footer stays valid
        f.seek(start)
        f.write(b"\xff" * 16)
    stream = build_stream(_cfg(url, shuffle=False), rank=0, world_size=1, seed=0)
    with pytest.warns(BadDataWarning, match=r"shard-00000\.parquet row group 1 unreadable"):
        n = sum(int(b["valid"].sum()) for b in stream)
    assert n == 100 and stream.counters()["shard_mismatch"] == 20
