"""s3:// for real: a moto S3 server on 127.0.0.1 (started and stopped here), s3fs, the arrow reader and builder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from pretrain.data import DataConfig, Manifest, SourceConfig, build_stream, make_sample_corpus
from pretrain.data.builders import build

pytest.importorskip("s3fs")
pytestmark = pytest.mark.slow

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_server():
    """Run moto's S3 server on a free 127.0.0.1 port; point AWS_ENDPOINT_URL at it; yield the endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(endpoint, timeout=0.5)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("moto_server exited at start") from None
                time.sleep(0.1)
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # no cached client pointing at another endpoint
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3():
    with moto_server() as endpoint:
        import s3fs

        s3fs.S3FileSystem().mkdir("corpus")
        yield endpoint


def test_sample_corpus_on_s3_round_trip_and_resume(s3):
    url = make_sample_corpus(
        "s3://corpus/sample", num=90, size=32, seed=2, num_val=10, shard_rows=40, row_group_rows=10
    )
    assert url == "s3://corpus/sample/train/manifest.json"
    m = Manifest.load(url)
    assert m.num_rows == 90 and m.shard_url(0) == "s3://corpus/sample/train/shard-00000.parquet"
    cfg = DataConfig(sources=[SourceConfig("s3", url)], image_size=16, batch_size=10, num_workers=2)
    first = build_stream(cfg, rank=0, world_size=1, seed=0)
    seen = []
    for b in first:
        seen += b["key"]
        if len(seen) == 40:
            break
    second = build_stream(cfg, rank=0, world_size=1, seed=0)
    second.load_state_dict(first.state_dict())
    rest = [k for b in second for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert len(set(seen + rest)) == 90 == len(seen) + len(rest)


def test_build_to_s3_and_missing_shard_message(s3, tmp_path):
    import s3fs

    src = tmp_path / "in" / "cat"
    src.mkdir(parents=True)
    local = make_sample_corpus(str(tmp_path / "gen"), num=6, size=24, seed=1, num_val=0)
    import pyarrow.parquet as pq

    for i, data in enumerate(
        pq.read_table(local.replace("manifest.json", "shard-00000.parquet")).column("image")
    ):
        (src / f"{i}.jpg").write_bytes(data.as_py())
    url = build(
        "folder", str(tmp_path / "in"), "s3://corpus/built", shard_rows=4, row_group_rows=2, progress=False
    )
    m = Manifest.load(url)
    assert m.num_rows == 6 and m.label_names == ["cat"] and len(m.shards) == 2
    s3fs.S3FileSystem().rm("corpus/built/p00001-000.parquet")
    with pytest.raises(FileNotFoundError, match="s3://corpus/built/p00001-000.parquet"):
        Manifest.load(url)


def test_rebuild_into_s3_redoes_changed_parts(s3, tmp_path):
    """The part fingerprints and the clean-up of an earlier input's parts work on an object store too."""
    import s3fs

    src = tmp_path / "in"
    local = make_sample_corpus(str(tmp_path / "gen"), num=6, size=24, seed=2, num_val=0)
    import pyarrow.parquet as pq

    images = pq.read_table(local.replace("manifest.json", "shard-00000.parquet")).column("image").to_pylist()
    (src / "dog").mkdir(parents=True)
    for i, data in enumerate(images[:4]):
        (src / "dog" / f"{i}.jpg").write_bytes(data)
    out = "s3://corpus/rebuilt"
    build("folder", str(src), out, shard_rows=2, row_group_rows=2, progress=False)
    (src / "ant").mkdir()
    (src / "ant" / "a.jpg").write_bytes(images[4])
    with pytest.warns(UserWarning, match="rebuilding"):
        url = build("folder", str(src), out, shard_rows=2, row_group_rows=2, progress=False)
    m = Manifest.load(url)
    assert m.label_names == ["ant", "dog"] and m.num_rows == 5
    labels = {}
    for i in range(len(m.shards)):
        with s3fs.S3FileSystem().open(m.shard_url(i).split("://", 1)[1], "rb") as f:
            for r in pq.read_table(f, columns=["key", "label"]).to_pylist():
                labels[r["key"]] = m.label_names[r["label"]]
    assert labels == {k: k.split("/")[0] for k in labels} and len(labels) == 5
    # a smaller input: the parts it no longer has are deleted with their shards
    for p in (src / "dog").iterdir():
        p.unlink()
    (src / "dog").rmdir()
    with pytest.warns(UserWarning, match="not in this input; deleting its shards"):
        build("folder", str(src), out, shard_rows=2, row_group_rows=2, progress=False)
    left = sorted(p.rsplit("/", 1)[1] for p in s3fs.S3FileSystem().find("corpus/rebuilt"))
    assert left == ["manifest.json", "p00000-000.parquet", "p00000.json"], left


def test_monitor_with_an_s3_output_dir_writes_there_and_resumes(s3, tmp_path):
    """output_dir=s3://... is never turned into a local `s3:/...` folder: metrics.jsonl and TensorBoard reach the
    bucket, and a resumed run continues the remote metrics without its replayed steps."""
    from pretrain.data import storage
    from pretrain.monitor.writer import Monitor

    url = "s3://corpus/run-monitor"
    monitor = Monitor(url, enabled=True, console=False)
    for step in (1, 2, 3):
        monitor.scalars(step, {"loss": 1.0 / step})
    monitor.close()
    assert not os.path.exists("s3:") and not os.path.exists(os.path.join(os.getcwd(), "s3:"))
    lines = storage.read_bytes(storage.join(url, "metrics.jsonl")).decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert storage.glob(storage.join(url, "tb", "events.out.tfevents.*"))

    resumed = Monitor(url, enabled=True, console=False)
    resumed.resume(2)  # the checkpoint was at step 2: step 3 is replayed
    resumed.scalars(3, {"loss": 0.3})
    resumed.close()
    lines = storage.read_bytes(storage.join(url, "metrics.jsonl")).decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
