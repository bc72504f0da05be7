"""`pretrain data build`: turn raw inputs into shards + manifest.

Inputs: an image-folder tree (class sub-folders become labels, ImageNet-22K style; an optional `.txt` next
to an image is its caption), img2dataset output (its `parquet` format and its `webdataset` format: tars of
jpg/txt/json plus a parquet with the `status` column), and a CSV/TSV of image path + caption (+ optional
label). Work is cut into parts (one input file, or a chunk of files); each part writes its own shards and
then a small `_parts/<id>.json` record, so a rerun skips finished parts (resumable) and parts run in
parallel processes. The manifest is written last, atomically, from the part records.

A record is reused only when its fingerprint matches: a hash of the part's input (file names, sizes and
modification times, labels, captions) and of the options that shape its rows (format, source, shard and
row-group sizes). Anything else (a class folder added, another input, other options) rebuilds the part;
records and shards of parts the new plan no longer has are deleted. A CSV's referenced images are not
stat'ed (one call per file): replacing an image under the same name needs a fresh output folder.

img2dataset's per-sample `status` categories (`failed_to_download`, `failed_to_resize`, ...) are kept as
the skipped reasons, and each part record lists (up to SKIPPED_KEYS_KEPT per reason) the skipped keys.
"""

from __future__ import annotations

import csv
import hashlib
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
FINGERPRINT_VERSION = 1  # bump when a builder change alters the rows a part writes from the same input
SKIPPED_KEYS_KEPT = 1000  # per reason and part, in `_parts/<id>.json`


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


def _list_files(url: str, stamps: dict[str, str] | None = None) -> list[str]:
    """Every file under url (sorted URLs); `stamps` receives "size:mtime" (or ETag) per file for the part
    fingerprints, from the same listing (no extra calls)."""
    fs, path = storage.url_to_fs(url)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if storage.is_local(fs) else f"{proto}://"
    found = fs.find(path, detail=True)
    if stamps is not None:
        for p, info in found.items():
            changed = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag")
            stamps[prefix + p] = f"{info.get('size')}:{changed}"
    return sorted(prefix + p for p in found)


def _plan_folder(url: str, shard_rows: int, stamps: dict[str, str]):
    listing = _list_files(url, stamps)
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


def _plan_img2dataset(url: str, fmt: str, stamps: dict[str, str]):
    files = _list_files(url, stamps)
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
        self.skipped_keys: dict[str, list[str]] = {}

    def skip(self, reason: str, what: str, key: str | None = None, n: int = 1, warn: bool = True) -> None:
        """Count n skipped samples under `reason`, remember the key, and warn (not for img2dataset's own
        download failures: a web crawl loses a third of its samples, one warning each would drown the log)."""
        self.stats["skipped"][reason] = self.stats["skipped"].get(reason, 0) + n
        if key is not None:
            keys = self.skipped_keys.setdefault(reason, [])
            if len(keys) < SKIPPED_KEYS_KEPT:
                keys.append(key)
        if warn:
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


def _run_part(
    part, out: str, source: str, shard_rows: int, row_group_rows: int, fingerprint: str = ""
) -> dict:
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
                    w.skip("missing_file", f"{rel} ({type(err).__name__})", key=rel)
                    continue
                w.add(rel, data, caption, label)
        elif kind == "i2d_parquet":
            _img2dataset_parquet(payload, w)
        elif kind == "tar":
            _webdataset_tar(payload, w)
        w.flush()
    record = {
        "part": pid,
        "fingerprint": fingerprint,
        "shards": [asdict(s) for s in w.shards],
        "stats": w.stats,
        "skipped_keys": w.skipped_keys,
        "warnings": [str(c.message) for c in caught][:50],
    }
    storage.write_bytes_atomic(storage.join(out, "_parts", f"{pid}.json"), json.dumps(record).encode())
    return record


def _img2dataset_parquet(url: str, w: _PartWriter) -> None:
    """img2dataset `--output_format parquet`: image bytes in `jpg` (or png/webp), `status` per row."""
    t = storage.read_parquet(url)
    names = t.column_names
    img_col = next((c for c in ("jpg", "png", "webp", "image") if c in names), None)
    if img_col is None:
        w.skip("shard_mismatch", f"{url} (no image column in {names})")
        return
    for r in t.to_pylist():
        status = r.get("status", "success")
        if status != "success":  # img2dataset's category: failed_to_download, failed_to_resize, ...
            w.skip(
                str(status or "unknown_status"), f"{r.get('key')} in {url}", key=str(r.get("key")), warn=False
            )
            continue
        if not r.get(img_col):
            w.skip("missing_image", f"{r.get('key')} in {url}", key=str(r.get("key")))
            continue
        meta = {
            k: r[k] for k in ("url", "original_width", "original_height", "sha256") if r.get(k) is not None
        }
        w.add(str(r["key"]), r[img_col], r.get("caption"), None, meta)


def _webdataset_tar(url: str, w: _PartWriter) -> None:
    """img2dataset `--output_format webdataset`: NNNNN.tar of key.jpg/key.txt/key.json + NNNNN.parquet.

    The side parquet lists every attempted sample with its status: failures are counted under their status,
    and successful samples that the tar does not deliver (a truncated tar) are counted as `truncated_tar`
    with their keys. After a truncation, the sample being read when the data ended is dropped unless it has
    every file its siblings have (otherwise an image would be kept without its caption).
    """
    side = url[:-4] + ".parquet"
    expected: list[str] | None = None
    if storage.exists(side):
        fs, path = storage.url_to_fs(side)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in ("key", "status") if c in pf.schema_arrow.names]
            t = pf.read(columns=cols)
        status = t.column("status").to_pylist() if "status" in cols else []
        keys = t.column("key").to_pylist() if "key" in cols else [None] * len(status)
        expected = [] if "key" in cols else None
        for key, st in zip(keys, status):
            if st != "success":
                w.skip(str(st or "unknown_status"), f"{key} in {side}", key=str(key), warn=False)
            elif expected is not None:
                expected.append(str(key))
    fs, path = storage.url_to_fs(url)
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    truncated = None
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                if key not in samples:
                    order.append(key)
                samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:  # truncated tar: keep the complete samples before it
        truncated = err
    if truncated is not None and order:
        last = order[-1]
        siblings = set().union(*(samples[k].keys() for k in order[:-1])) if len(order) > 1 else {"json"}
        if not siblings <= samples[last].keys():
            del samples[last]
            order.pop()
    if truncated is not None:
        if expected is not None:
            # counted from the side parquet's successes; keys named where they match the tar's member names
            lost = [k for k in expected if k not in samples]
            n_lost = max(len(expected) - len(samples), 0)
            for i in range(n_lost):
                w.skip("truncated_tar", url, key=lost[i] if i < len(lost) else None, warn=False)
            warnings.warn(
                f"build: skipping {n_lost} sample(s) of {url}: the tar is truncated after {len(samples)} "
                f"complete samples ({truncated}); {side} lists {len(expected)} successful ones",
                stacklevel=2,
            )
        else:
            w.skip(
                "truncated_tar",
                f"{url} after {len(samples)} complete samples ({truncated}; no {side} to say how many were "
                "lost: counted as one)",
            )
    for key in sorted(samples):
        files = samples[key]
        img = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        if img is None:
            w.skip("missing_image", f"{key} in {url}", key=key)
            continue
        meta = json.loads(files["json"]) if "json" in files else {}
        caption = files["txt"].decode("utf-8") if "txt" in files else meta.get("caption")
        keep = {
            k: meta[k]
            for k in ("url", "original_width", "original_height", "sha256")
            if meta.get(k) is not None
        }
        w.add(str(meta.get("key", key)), img, caption, None, keep)


def _part_inputs(part) -> list[str]:
    """The input URLs a part reads (for its fingerprint)."""
    _, kind, payload = part
    if kind == "files":
        return [u for url, _, _, _, cap in payload for u in (url, cap) if u]
    return [payload, payload[:-4] + ".parquet"] if kind == "tar" else [payload]


def part_fingerprint(part, stamps: dict[str, str], options: dict) -> str:
    """Hash of everything that decides a part's rows: its plan entry (files, labels, captions), the listed
    size and modification time of each input file, and the build options."""
    body = {
        "version": FINGERPRINT_VERSION,
        "part": list(part),
        "stamps": [stamps.get(u) for u in _part_inputs(part)],
        "options": options,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _drop_record(out: str, rec: dict) -> None:
    """Delete a part record first (a crash then leaves the part to redo), then the shards it listed."""
    storage.remove(storage.join(out, "_parts", f"{rec['part']}.json"))
    for shard in rec.get("shards", []):
        storage.remove(storage.resolve(out, shard["uri"]))


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
    stamps: dict[str, str] = {}
    if fmt == "folder":
        parts, label_names = _plan_folder(input_url, shard_rows, stamps)
    elif fmt == "csv":
        parts, label_names = _plan_csv(input_url, shard_rows, csv_columns)
    else:
        parts, label_names = _plan_img2dataset(input_url, fmt, stamps)
    if not parts:
        raise FileNotFoundError(f"no input found for format {fmt!r} under {input_url}")
    options = {"format": fmt, "source": source, "shard_rows": shard_rows, "row_group_rows": row_group_rows}
    fingerprints = {p[0]: part_fingerprint(p, stamps, options) for p in parts}
    storage.makedirs(out)
    records: dict[str, dict] = {}
    todo = []
    previous = {}
    for rec_url in storage.glob(storage.join(out, "_parts", "*.json")):
        rec = json.loads(storage.read_bytes(rec_url))
        previous[rec["part"]] = rec
    for pid, rec in sorted(previous.items()):
        if pid not in fingerprints:  # an earlier build of another input: its shards must not linger
            warnings.warn(f"build: {out}: part {pid} is not in this input; deleting its shards", stacklevel=2)
            _drop_record(out, rec)
    redone = []
    for part in parts:
        rec = previous.get(part[0])
        if rec is not None and rec.get("fingerprint") == fingerprints[part[0]]:
            records[part[0]] = rec  # finished in an earlier run, from the same input and options
            continue
        if rec is not None:
            redone.append(part[0])
            _drop_record(out, rec)
        todo.append(part)
    if redone:
        warnings.warn(
            f"build: {out}: {len(redone)} part(s) ({', '.join(redone[:5])}{'...' if len(redone) > 5 else ''}) "
            "were built from a different input or options; rebuilding them",
            stacklevel=2,
        )
    from tqdm import tqdm

    bar = tqdm(
        total=len(parts), initial=len(records), unit="part", desc=f"build {name}", disable=not progress
    )
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [
                pool.submit(_run_part, p, out, source, shard_rows, row_group_rows, fingerprints[p[0]])
                for p in todo
            ]
            for fut in as_completed(futures):
                rec = fut.result()
                records[rec["part"]] = rec
                bar.update(1)
    else:
        for p in todo:
            rec = _run_part(p, out, source, shard_rows, row_group_rows, fingerprints[p[0]])
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
