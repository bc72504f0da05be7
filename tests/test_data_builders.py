"""Builders -> reader round trips for every input format, with real img2dataset-format fixtures."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pretrain.data import DataConfig, Manifest, SourceConfig, build_stream
from pretrain.data.builders import build
from pretrain.data.sample import SHAPES, caption_for, render

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _images(n, seed=0, fmt="JPEG"):
    """n real images (encoded) with their captions and shape labels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, attrs = render(rng, 40)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt)
        out.append((buf.getvalue(), caption_for(attrs, rng), attrs["shape"]))
    return out


def _read_all(manifest_url, **kw):
    cfg = DataConfig(
        sources=[SourceConfig("x", manifest_url)],
        image_size=24,
        batch_size=8,
        shuffle=False,
        num_workers=0,
        **kw,
    )
    rows = {}
    for b in build_stream(cfg, rank=0, world_size=1, seed=0):
        for i, ok in enumerate(b["valid"].tolist()):
            if ok:
                rows[b["key"][i]] = (b["caption"][i], int(b["label"][i]), bool(b["has_caption"][i]))
    return rows


def test_image_folder(tmp_path):
    root = tmp_path / "in"
    imgs = _images(12)
    for i, (data, caption, shape) in enumerate(imgs):
        d = root / shape
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.jpg").write_bytes(data)
        if i % 3 == 0:
            (d / f"{i:03d}.txt").write_text(caption)
    (root / "broken").mkdir()
    (root / "broken" / "x.jpg").write_bytes(b"not an image")
    url = build("folder", str(root), str(tmp_path / "out"), shard_rows=5, row_group_rows=2, progress=False)
    m = Manifest.load(url)
    classes = sorted({s for _, _, s in imgs} | {"broken"})
    assert m.label_names == classes and m.num_rows == 12 and m.stats["skipped"] == {"bad_image": 1}
    rows = _read_all(url)
    assert len(rows) == 12
    for i, (_, caption, shape) in enumerate(imgs):
        got_caption, label, has = rows[f"{shape}/{i:03d}.jpg"]
        assert m.label_names[label] == shape
        assert has == (i % 3 == 0) and got_caption == (caption if i % 3 == 0 else "")


@pytest.mark.slow
def test_folder_build_is_resumable_and_parallel(tmp_path):
    root = tmp_path / "in"
    for i, (data, _, shape) in enumerate(_images(10, seed=1)):
        (root / shape).mkdir(parents=True, exist_ok=True)
        (root / shape / f"{i}.png").write_bytes(data)
    out = tmp_path / "out"
    url = build("folder", str(root), str(out), shard_rows=3, row_group_rows=2, workers=2, progress=False)
    first = json.loads(open(url).read())
    parts = sorted((out / "_parts").iterdir())
    assert len(parts) == 4
    # a rerun after losing one part's record redoes only that part and yields the same manifest
    stamp = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()
    url = build("folder", str(root), str(out), shard_rows=3, row_group_rows=2, progress=False)
    assert json.loads(open(url).read())["shards"] == first["shards"]
    redone = [p.name for p in sorted((out / "_parts").iterdir()) if stamp.get(p.name) != p.stat().st_mtime_ns]
    assert redone == [parts[1].name]


def _i2d_parquet_table(samples, failed, shard, failed_status="failed_to_download"):
    rows = []
    for i, (data, caption, _) in enumerate(samples):
        rows.append(
            dict(
                key=f"{shard:05d}{i:04d}",
                jpg=data,
                caption=caption,
                url=f"http://x/{i}.jpg",
                status="success",
                error_message=None,
                width=40,
                height=40,
                original_width=80,
                original_height=80,
                exif="{}",
                sha256="0" * 64,
            )
        )
    for j in range(failed):
        rows.append(
            dict(
                key=f"{shard:05d}{len(samples) + j:04d}",
                jpg=None,
                caption="lost",
                url=f"http://x/f{j}.jpg",
                status=failed_status,
                error_message="HTTP 404",
                width=None,
                height=None,
                original_width=None,
                original_height=None,
                exif=None,
                sha256=None,
            )
        )
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("jpg", pa.binary()),
            ("caption", pa.string()),
            ("url", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("original_width", pa.int64()),
            ("original_height", pa.int64()),
            ("exif", pa.string()),
            ("sha256", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def test_img2dataset_parquet(tmp_path):
    inp = tmp_path / "i2d"
    inp.mkdir()
    samples = _images(9, seed=2)
    pq.write_table(_i2d_parquet_table(samples[:5], failed=2, shard=0), inp / "00000.parquet")
    pq.write_table(
        _i2d_parquet_table(samples[5:], failed=1, shard=1, failed_status="failed_to_resize"),
        inp / "00001.parquet",
    )
    (inp / "00000_stats.json").write_text("{}")
    out = tmp_path / "out"
    url = build("img2dataset", str(inp), str(out), row_group_rows=4, progress=False)
    m = Manifest.load(url)
    # img2dataset's own status categories are kept (a decode failure is not a failed download)
    assert m.stats["skipped"] == {"failed_to_download": 2, "failed_to_resize": 1}
    assert m.num_rows == 9 and m.label_names is None
    record = json.loads((out / "_parts" / "p00001.json").read_text())
    assert record["skipped_keys"] == {"failed_to_resize": ["000010004"]}
    rows = _read_all(url)
    assert len(rows) == 9 and all(label == -1 and has for _, label, has in rows.values())
    assert {c for c, _, _ in rows.values()} == {c for _, c, _ in samples}


def test_img2dataset_webdataset(tmp_path):
    inp = tmp_path / "wds"
    inp.mkdir()
    samples = _images(7, seed=3)
    for shard, chunk in ((0, samples[:4]), (1, samples[4:])):
        with tarfile.open(inp / f"{shard:05d}.tar", "w") as tar:
            for i, (data, caption, _) in enumerate(chunk):
                key = f"{shard:05d}{i:04d}"
                meta = {"key": key, "caption": caption, "url": f"http://x/{key}", "status": "success"}
                for ext, payload in (
                    ("jpg", data),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
            if shard == 1:  # a sample whose image is missing from the tar
                info = tarfile.TarInfo(f"{shard:05d}9999.txt")
                info.size = 3
                tar.addfile(info, io.BytesIO(b"odd"))
        status = ["success"] * len(chunk) + ["failed_to_download"] * (shard + 1)
        pq.write_table(
            pa.table({"key": [str(i) for i in range(len(status))], "status": status}),
            inp / f"{shard:05d}.parquet",
        )
    url = build("webdataset", str(inp), str(tmp_path / "out"), shard_rows=3, row_group_rows=2, progress=False)
    m = Manifest.load(url)
    assert m.num_rows == 7 and m.stats["skipped"] == {"failed_to_download": 3, "missing_image": 1}
    rows = _read_all(url)
    assert rows["000000002"][0] == samples[2][1] and rows["000010001"][0] == samples[5][1]


def test_csv_tsv(tmp_path):
    samples = _images(6, seed=4)
    (tmp_path / "img").mkdir()
    with open(tmp_path / "list.tsv", "w", newline="") as f:
        w = csv.writer(f, dialect="excel-tab")
        w.writerow(["image", "caption", "label"])
        for i, (data, caption, shape) in enumerate(samples):
            (tmp_path / "img" / f"{i}.jpg").write_bytes(data)
            w.writerow([f"img/{i}.jpg", caption, shape])
        w.writerow(["img/missing.jpg", "gone", "star"])
    url = build("csv", str(tmp_path / "list.tsv"), str(tmp_path / "out"), progress=False)
    m = Manifest.load(url)
    assert m.num_rows == 6 and m.stats["skipped"] == {"missing_file": 1}
    rows = _read_all(url)
    for i, (_, caption, shape) in enumerate(samples):
        got, label, _ = rows[f"img/{i}.jpg"]
        assert got == caption and m.label_names[label] == shape and shape in SHAPES


def _write_tar(path, samples, prefix):
    """img2dataset webdataset layout (jpg, txt, json per sample, in that order) + its side parquet."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i, (data, caption, _) in enumerate(samples):
            key = f"{prefix}{i:04d}"
            keys.append(key)
            meta = {"key": key, "caption": caption, "status": "success"}
            for ext, payload in (
                ("jpg", data),
                ("txt", caption.encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys)}), str(path)[:-4] + ".parquet")
    return keys


def test_truncated_tar_counts_every_lost_sample_and_keeps_no_half_sample(tmp_path):
    inp = tmp_path / "wds"
    inp.mkdir()
    samples = _images(14, seed=5)
    keys = _write_tar(inp / "00000.tar", samples, "0000")
    raw = (inp / "00000.tar").read_bytes()
    # cut inside sample 3's txt member: samples 0-2 complete, sample 3 has only its jpg, 10 after it are gone
    with tarfile.open(inp / "00000.tar") as tar:
        txt3 = next(m for m in tar.getmembers() if m.name == f"{keys[3]}.txt")
    (inp / "00000.tar").write_bytes(raw[: txt3.offset_data + 2])
    url = build("webdataset", str(inp), str(tmp_path / "out"), progress=False)
    m = Manifest.load(url)
    assert m.num_rows == 3 and m.stats["skipped"] == {"truncated_tar": 11}
    rows = _read_all(url)
    assert sorted(rows) == keys[:3] and all(has for _, _, has in rows.values())
    record = json.loads((tmp_path / "out" / "_parts" / "p00000.json").read_text())
    assert record["skipped_keys"]["truncated_tar"] == keys[3:]


def _folder(root, samples, start=0):
    for i, (data, _, shape) in enumerate(samples, start):
        (root / shape).mkdir(parents=True, exist_ok=True)
        (root / shape / f"{i:03d}.png").write_bytes(data)


def test_rebuild_of_a_changed_input_into_the_same_folder(tmp_path):
    """Parts are reused only when built from the same input and options (fingerprint per part)."""
    root, out = tmp_path / "in", tmp_path / "out"
    samples = _images(8, seed=6)
    _folder(root, samples)
    build("folder", str(root), str(out), shard_rows=3, row_group_rows=2, progress=False)
    # a new class folder that sorts first shifts every label index; the rebuild must redo every part
    (root / "aaa").mkdir()
    for i, (data, _, _) in enumerate(_images(3, seed=7)):
        (root / "aaa" / f"new{i}.png").write_bytes(data)
    with pytest.warns(UserWarning, match="different input or options; rebuilding"):
        url = build("folder", str(root), str(out), shard_rows=3, row_group_rows=2, progress=False)
    m = Manifest.load(url)
    assert m.num_rows == 11 and m.label_names[0] == "aaa"
    rows = _read_all(url)
    assert len(rows) == 11
    for key, (_, label, _) in rows.items():
        assert m.label_names[label] == key.split("/")[0], key

    # another input into the same folder: only its rows, no shard of the old input left behind
    other = tmp_path / "other"
    _folder(other, _images(4, seed=8), start=100)
    url = build("folder", str(other), str(out), shard_rows=3, row_group_rows=2, progress=False)
    m = Manifest.load(url)
    rows = _read_all(url)
    assert m.num_rows == 4 and sorted(int(k.split("/")[1][:3]) for k in rows) == [100, 101, 102, 103]
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(s.uri for s in m.shards)
    assert sorted(p.name for p in (out / "_parts").iterdir()) == ["p00000.json", "p00001.json"]

    # other options (row-group size) with the same input: redone too
    url = build("folder", str(other), str(out), shard_rows=3, row_group_rows=1, progress=False)
    assert {s.row_group_rows for s in Manifest.load(url).shards} == {1}
    assert len(_read_all(url)) == 4
