"""The Ray reader on a local Ray instance: same batches as the arrow reader, exact resume, read_parquet."""

from __future__ import annotations

import re

import pytest
import torch

from pretrain.data import DataConfig, SourceConfig, build_stream, make_sample_corpus

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray per run. A moto S3 server starts first so Ray's workers inherit its endpoint (env)."""
    import contextlib

    started = not ray.is_initialized()
    with contextlib.ExitStack() as stack:
        s3 = None
        if started:
            try:
                from test_data_s3 import moto_server

                s3 = stack.enter_context(moto_server())
            except ImportError:
                pass
            ray.init(
                num_cpus=4, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False
            )
        yield s3
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("raysample")
    return make_sample_corpus(
        str(out), num=300, size=40, seed=4, num_val=0, shard_rows=100, row_group_rows=25
    )


def _cfg(uri, reader, **kw):
    base = dict(
        sources=[SourceConfig("s", uri)],
        image_size=24,
        batch_size=16,
        views=2,
        reader=reader,
        num_workers=1,
        ray_num_cpus=0.5,
    )
    base.update(kw)
    return DataConfig(**base)


def test_ray_matches_arrow_and_resumes(ray_session, corpus):
    arrow = list(build_stream(_cfg(corpus, "arrow"), rank=1, world_size=2, seed=3))
    rs = build_stream(_cfg(corpus, "ray"), rank=1, world_size=2, seed=3)
    got = []
    for b in rs:
        got.append(b)
        if len(got) == 3:
            break
    state = rs.state_dict()
    assert state["consumed"] == 3 * 32
    # resume the Ray stream on a single rank from the saved cursor: no repeats, nothing skipped
    r2 = build_stream(_cfg(corpus, "ray", batch_size=20), rank=0, world_size=1, seed=3)
    r2.load_state_dict(state)
    rest = list(r2)
    assert len(got) == 3 and r2.epoch == 1
    for a, b in zip(arrow[:3], got):
        assert (
            a["key"] == b["key"]
            and torch.equal(a["image"], b["image"])
            and torch.equal(a["image2"], b["image2"])
        )
        assert torch.equal(a["view_boxes"], b["view_boxes"]) and a["caption"] == b["caption"]
    r0 = list(build_stream(_cfg(corpus, "arrow"), rank=0, world_size=2, seed=3))
    before = {k for b in r0[:3] + got for k, v in zip(b["key"], b["valid"].tolist()) if v}
    after = [k for b in rest for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert (
        len(before) == 96
        and len(after) == 300 - 96
        and before.isdisjoint(after)
        and len(set(after)) == len(after)
    )
    assert r2.counters()["samples"] == 204


def test_ray_blocks_of_several_steps_keep_the_order(ray_session, corpus, monkeypatch):
    """Several steps per Ray block, the last block short, the epoch read as several datasets: the same
    batches, in order, as the arrow reader."""
    from pretrain.data import ray_reader

    monkeypatch.setattr(ray_reader, "ROWS_PER_BLOCK", 48)  # 3 steps of 16 per block; 10 steps -> 3, 3, 3, 1
    monkeypatch.setattr(ray_reader, "BLOCKS_PER_DATASET", 2)  # the epoch as two datasets of two blocks
    cfg = dict(views=1, batch_size=16)
    assert ray_reader.steps_per_block(_cfg(corpus, "ray", **cfg)) == 3
    arrow = list(build_stream(_cfg(corpus, "arrow", **cfg), rank=0, world_size=2, seed=1))
    got = list(build_stream(_cfg(corpus, "ray", **cfg), rank=0, world_size=2, seed=1))
    assert len(got) == len(arrow) == 10
    for a, b in zip(arrow, got):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["valid"], b["valid"])


def test_every_block_is_its_own_ray_task(ray_session, corpus, monkeypatch):
    """One Ray task per block, also with many blocks: tasks that decoded several blocks each would make the
    decode actors take turns (the output keeps task order)."""
    from pretrain.data import ray_reader
    from pretrain.data.ray_reader import ray_dataset

    monkeypatch.setattr(ray_reader, "ROWS_PER_BLOCK", 16)  # one step per block
    cfg = _cfg(corpus, "ray", views=1, samples_per_epoch=2 * 16 * 200, num_workers=2)
    ds = ray_dataset(cfg, rank=0, world_size=2, seed=0).materialize()
    tasks = re.search(r"MapBatches\(_DecodeSteps\): (\d+) tasks executed", ds.stats())
    assert tasks, f"Ray Data's stats no longer name the tasks executed:\n{ds.stats()}"
    assert int(tasks.group(1)) == 200


def test_steps_per_block_bounds_block_bytes():
    from pretrain.data.ray_reader import MAX_BLOCK_BYTES, steps_per_block

    small = DataConfig(sources=[SourceConfig("s", "x")], image_size=224, batch_size=64, views=2)
    assert steps_per_block(small) == 4  # 256 rows, 77 MB
    big = DataConfig(sources=[SourceConfig("s", "x")], image_size=512, batch_size=64, views=2)
    assert steps_per_block(big) == 1  # one step is already 100 MB: never fewer than one
    mid = DataConfig(sources=[SourceConfig("s", "x")], image_size=384, batch_size=32, views=2)
    k = steps_per_block(mid)
    assert 1 <= k < 8 and k * 32 * 2 * 3 * 384**2 <= MAX_BLOCK_BYTES


def test_ray_dataset_is_pre_split(ray_session, corpus):
    from pretrain.data.ray_reader import ray_dataset

    cfg = _cfg(corpus, "ray", views=1)
    counts = [ray_dataset(cfg, rank=r, world_size=2, seed=0).count() for r in range(2)]
    assert counts == [160, 160]  # 10 global steps of 2 x 16 rows, the last one padded


def test_read_corpus_column_pruning(ray_session, corpus):
    from pretrain.data.ray_reader import read_corpus

    ds = read_corpus(corpus, columns=["key", "label"])
    rows = ds.take_all()
    assert len(rows) == 300 and set(rows[0]) == {"key", "label"}


def test_ray_reader_on_s3(ray_session, tmp_path):
    if ray_session is None:
        pytest.skip("Ray was started elsewhere without the moto endpoint in its workers' environment")
    import s3fs

    s3fs.S3FileSystem().mkdir("raycorpus")
    url = make_sample_corpus(
        "s3://raycorpus/c", num=50, size=32, seed=5, num_val=0, shard_rows=20, row_group_rows=10
    )
    keys = [
        k for b in build_stream(_cfg(url, "ray", views=1), rank=0, world_size=1, seed=0) for k in b["key"]
    ]
    assert len([k for k in keys if k]) == 50 == len({k for k in keys if k})
    from pretrain.data.ray_reader import read_corpus

    assert read_corpus(url, columns=["key"]).count() == 50
