"""`pretrain data build`: turn raw inputs into shards + manifest.

Inputs: an image-folder tree (class sub-folders become labels, ImageNet-22K style; an optional `.txt` next
to an image is its caption), img2dataset output (its `parquet` format and its `webdataset` format: tars of
jpg/txt/json plus a parquet with the `status` column), and a CSV/TSV of image path + caption (+ optional
label). Work is cut into parts (one input file, or a chunk of files); each part writes its own shards and
then a small `_parts/<id>.json` record, so a rerun skips finished parts (resumable) and parts run in
parallel processes. The manifest is written last, atomically, from the part records.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict

import pyarrow.parquet as pq
from PIL import Image

from . import storage
from .schema import MANIFEST_NAME, Manifest, ShardInfo, empty_columns, write_shard

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FORMATS = ("folder", "img2dataset", "webdataset", "csv")


def add_arguments(parser) -> None:
    parser.add_argument("format", choices=FORMATS, help="input layout")
    parser.add_argument(
        "input", help="input folder (folder, img2dataset, webdataset) or CSV/TSV file; any fsspec URL"
    )
    parser.add_argument("out", help="output folder URL: shards, _parts/ and manifest.json go there")
    parser.add_argument("--name", default=None, help="corpus name (default: the output folder's name)")
    parser.add_argument("--source", default=None, help="value of the `source` column (default: the name)")
    parser.add_argument("--shard-rows", type=int, default=5000, help="max rows per shard (default 5000)")
    parser.add_argument("--row-group-rows", type=int, default=256, help="rows per row group (default 256)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--image-column", default="image", help="csv: column with the image path")
    parser.add_argument("--caption-column", default="caption", help="csv: column with the caption")
    parser.add_argument("--label-column", default="label", help="csv: column with the class name (optional)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    t0 = time.perf_counter()
    url = build(
        args.format,
        args.input,
        args.out,
        name=args.name,
        source=args.source,
        shard_rows=args.shard_rows,
        row_group_rows=args.row_group_rows,
        workers=args.workers,
        progress=not args.no_progress,
        csv_columns=(args.image_column, args.caption_column, args.label_column),
    )
    m = Manifest.load(url)
    print(
        f"wrote {url}: {m.num_rows} rows in {len(m.shards)} shards, {time.perf_counter() - t0:.1f}s; stats {m.stats}"
    )
    return 0


# --- parts: (id, kind, payload); payload is picklable so parts can run in worker processes ---------------


def _list_files(url: str) -> list[str]:
    fs, path = storage.url_to_fs(url)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if storage.is_local(fs) else f"{proto}://"
    return sorted(prefix + p for p in fs.find(path))


def _plan_folder(url: str, shard_rows: int):
    listing = _list_files(url)
    files = [f for f in listing if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    root = storage.url_to_fs(url)[1].rstrip("/")
    classes = sorted({_rel(f, root).split("/")[0] for f in files if "/" in _rel(f, root)})
    index = {c: i for i, c in enumerate(classes)}
    # image-folder convention: an optional caption in a sidecar .txt (looked up in the listing, no extra calls)
    texts = {os.path.splitext(f)[0]: f for f in listing if f.endswith(".txt")}
    items = []
    for f in files:
        rel = _rel(f, root)
        label = index[rel.split("/")[0]] if "/" in rel else None
        items.append((f, rel, label, None, texts.get(os.path.splitext(f)[0])))
    parts = [
        (f"p{i // shard_rows:05d}", "files", items[i : i + shard_rows])
        for i in range(0, len(items), shard_rows)
    ]
    return parts, (classes or None)


def _rel(f: str, root: str) -> str:
    p = f.split("://", 1)[-1]
    return p[len(root) :].lstrip("/") if p.startswith(root) else os.path.basename(p)


def _plan_csv(url: str, shard_rows: int, columns: tuple[str, str, str]):
    image_col, caption_col, label_col = columns
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "r", encoding="utf-8", newline="") as f:
        text = f.read()
    dialect = "excel-tab" if path.endswith((".tsv", ".tab")) or ("\t" in text.split("\n", 1)[0]) else "excel"
    rows = list(csv.DictReader(io.StringIO(text), dialect=dialect))
    if rows and image_col not in rows[0]:
        raise ValueError(f"{url}: no column {image_col!r} (columns: {list(rows[0])}); pass --image-column")
    base = storage.dirname(url)
    has_label = bool(rows) and label_col in rows[0]
    classes = sorted({r[label_col] for r in rows if r.get(label_col)}) if has_label else []
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for r in rows:
        label = index.get(r.get(label_col) or "") if has_label else None
        items.append(
            (storage.resolve(base, r[image_col]), r[image_col], label, r.get(caption_col) or None, None)
        )
    parts = [
        (f"p{i // shard_rows:05d}", "files", items[i : i + shard_rows])
        for i in range(0, len(items), shard_rows)
    ]
    return parts, (classes or None)


def _plan_img2dataset(url: str, fmt: str):
    files = _list_files(url)
    if fmt == "webdataset":
        tars = [f for f in files if f.endswith(".tar")]
        return [(f"p{os.path.basename(t)[:-4]}", "tar", t) for t in tars], None
    pqs = [f for f in files if f.endswith(".parquet")]
    return [(f"p{os.path.basename(p)[:-8]}", "i2d_parquet", p) for p in pqs], None


# --- part workers --------------------------------------------------------------------------------------------


class _PartWriter:
    """Accumulates rows of one part and writes `<part>-<j>.parquet` shards of at most shard_rows rows."""

    def __init__(self, out: str, part: str, source: str, shard_rows: int, row_group_rows: int):
        self.out, self.part, self.source = out, part, source
        self.shard_rows, self.row_group_rows = shard_rows, row_group_rows
        self.cols = empty_columns()
        self.shards: list[ShardInfo] = []
        self.stats = {"rows": 0, "with_caption": 0, "with_label": 0, "skipped": {}}

    def skip(self, reason: str, what: str) -> None:
        self.stats["skipped"][reason] = self.stats["skipped"].get(reason, 0) + 1
        warnings.warn(f"build: skipping {what}: {reason}", stacklevel=2)

    def add(self, key: str, data: bytes, caption, label, meta: dict | None = None) -> None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Exception as err:
            self.skip("bad_image", f"{key} ({type(err).__name__})")
            return
        c = self.cols
        c["key"].append(key)
        c["image"].append(data)
        c["caption"].append(caption or None)
        c["label"].append(label)
        c["source"].append(self.source)
        c["width"].append(w)
        c["height"].append(h)
        c["meta"].append(json.dumps(meta) if meta else None)
        self.stats["rows"] += 1
        self.stats["with_caption"] += bool(caption)
        self.stats["with_label"] += label is not None
        if len(c["key"]) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.cols["key"]:
            return
        url = storage.join(self.out, f"{self.part}-{len(self.shards):03d}.parquet")
        self.shards.append(write_shard(url, self.cols, self.row_group_rows))
        self.cols = empty_columns()


def _read(url: str) -> bytes:
    return storage.read_bytes(url)


def _run_part(part, out: str, source: str, shard_rows: int, row_group_rows: int) -> dict:
    pid, kind, payload = part
    w = _PartWriter(out, pid, source, shard_rows, row_group_rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "files":
            for url, rel, label, caption, caption_url in payload:
                try:
                    data = _read(url)
                    if caption_url:
                        caption = _read(caption_url).decode("utf-8").strip() or None
                except (FileNotFoundError, OSError) as err:
                    w.skip("missing_file", f"{rel} ({type(err).__name__})")
                    continue
                w.add(rel, data, caption, label)
        elif kind == "i2d_parquet":
            _img2dataset_parquet(payload, w)
        elif kind == "tar":
            _webdataset_tar(payload, w)
        w.flush()
    record = {
        "part": pid,
        "shards": [asdict(s) for s in w.shards],
        "stats": w.stats,
        "warnings": [str(c.message) for c in caught][:50],
    }
    storage.write_bytes_atomic(storage.join(out, "_parts", f"{pid}.json"), json.dumps(record).encode())
    return record


def _img2dataset_parquet(url: str, w: _PartWriter) -> None:
    """img2dataset `--output_format parquet`: image bytes in `jpg` (or png/webp), `status` per row."""
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as f:
        t = pq.read_table(f)
    names = t.column_names
    img_col = next((c for c in ("jpg", "png", "webp", "image") if c in names), None)
    if img_col is None:
        w.skip("shard_mismatch", f"{url} (no image column in {names})")
        return
    for r in t.to_pylist():
        if r.get("status", "success") != "success":
            w.stats["skipped"]["failed_download"] = w.stats["skipped"].get("failed_download", 0) + 1
            continue
        if not r.get(img_col):
            w.skip("missing_image", f"{r.get('key')} in {url}")
            continue
        meta = {
            k: r[k] for k in ("url", "original_width", "original_height", "sha256") if r.get(k) is not None
        }
        w.add(str(r["key"]), r[img_col], r.get("caption"), None, meta)


def _webdataset_tar(url: str, w: _PartWriter) -> None:
    """img2dataset `--output_format webdataset`: NNNNN.tar of key.jpg/key.txt/key.json + NNNNN.parquet."""
    side = url[:-4] + ".parquet"
    if storage.exists(side):  # the side parquet lists every attempted sample with its status
        fs, path = storage.url_to_fs(side)
        with fs.open(path, "rb") as f:
            status = pq.read_table(f, columns=["status"]).column("status").to_pylist()
        failed = sum(s != "success" for s in status)
        if failed:
            w.stats["skipped"]["failed_download"] = w.stats["skipped"].get("failed_download", 0) + failed
    fs, path = storage.url_to_fs(url)
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    except tarfile.TarError as err:  # truncated tar: keep what was read before the damage
        w.skip("truncated_tar", f"{url} after {len(samples)} samples ({err})")
    for key in sorted(samples):
        files = samples[key]
        img = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        if img is None:
            w.skip("missing_image", f"{key} in {url}")
            continue
        meta = json.loads(files["json"]) if "json" in files else {}
        caption = files["txt"].decode("utf-8") if "txt" in files else meta.get("caption")
        keep = {
            k: meta[k]
            for k in ("url", "original_width", "original_height", "sha256")
            if meta.get(k) is not None
        }
        w.add(str(meta.get("key", key)), img, caption, None, keep)


# --- driver -------------------------------------------------------------------------------------------------


def build(
    fmt: str,
    input_url: str,
    out: str,
    *,
    name: str | None = None,
    source: str | None = None,
    shard_rows: int = 5000,
    row_group_rows: int = 256,
    workers: int = 1,
    progress: bool = True,
    csv_columns: tuple[str, str, str] = ("image", "caption", "label"),
) -> str:
    """Build (or finish building) a corpus; returns the manifest URL."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; one of {FORMATS}")
    name = name or os.path.basename(out.rstrip("/")) or "corpus"
    source = source or name
    if fmt == "folder":
        parts, label_names = _plan_folder(input_url, shard_rows)
    elif fmt == "csv":
        parts, label_names = _plan_csv(input_url, shard_rows, csv_columns)
    else:
        parts, label_names = _plan_img2dataset(input_url, fmt)
    if not parts:
        raise FileNotFoundError(f"no input found for format {fmt!r} under {input_url}")
    storage.makedirs(out)
    records: dict[str, dict] = {}
    todo = []
    for part in parts:
        rec_url = storage.join(out, "_parts", f"{part[0]}.json")
        if storage.exists(rec_url):  # finished in an earlier run
            records[part[0]] = json.loads(storage.read_bytes(rec_url))
        else:
            todo.append(part)
    from tqdm import tqdm

    bar = tqdm(
        total=len(parts), initial=len(records), unit="part", desc=f"build {name}", disable=not progress
    )
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_run_part, p, out, source, shard_rows, row_group_rows) for p in todo]
            for fut in as_completed(futures):
                rec = fut.result()
                records[rec["part"]] = rec
                bar.update(1)
    else:
        for p in todo:
            rec = _run_part(p, out, source, shard_rows, row_group_rows)
            records[rec["part"]] = rec
            bar.update(1)
    bar.close()
    shards, skipped = [], {}
    stats = {"with_caption": 0, "with_label": 0}
    for pid in sorted(records):
        rec = records[pid]
        shards += [ShardInfo(**s) for s in rec["shards"]]
        for k in stats:
            stats[k] += rec["stats"][k]
        for k, v in rec["stats"]["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        for msg in rec.get("warnings", [])[:3]:
            warnings.warn(msg, stacklevel=2)
    manifest = Manifest(
        name=name,
        shards=shards,
        label_names=label_names,
        stats={**stats, "skipped": skipped, "sources": {source: sum(s.rows for s in shards)}},
        meta={"built_from": {"format": fmt, "input": input_url}, "builder": "pretrain.data.builders"},
    )
    return manifest.save(storage.join(out, MANIFEST_NAME))
