"""Rows -> one batch: read the planned rows (column-pruned row-group reads), decode, augment, collate.

Shared by both readers (the arrow reader calls it in threads, the Ray reader inside `map_batches`), so they
produce identical batches for the same positions. Bad data never raises from here: the row becomes a padding
row (valid=False), its reason is returned for the counters, and a warning names the key and the shard.
"""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pyarrow.parquet as pq

from . import storage
from .config import DataConfig
from .order import _LRU, Plan
from .schema import READ_COLUMNS, read_column_problems
from .transforms import decode_views, normalizer

REASONS = ("bad_image", "missing_shard", "shard_mismatch")
_WARN_LIMIT = 20  # per reason and process: a corpus with millions of bad rows must not flood the log


class BadDataWarning(UserWarning):
    """A sample or shard was skipped (key and shard named in the message)."""


class _Warner:
    def __init__(self):
        self.lock = threading.Lock()
        self.seen: dict[str, int] = {}

    def __call__(self, reason: str, msg: str) -> None:
        with self.lock:
            n = self.seen[reason] = self.seen.get(reason, 0) + 1
        if n <= _WARN_LIMIT:
            tail = f" (further {reason} warnings suppressed; see the counters)" if n == _WARN_LIMIT else ""
            warnings.warn(msg + tail, BadDataWarning, stacklevel=3)


def _retry(fn, tries: int = 3, delay: float = 0.5):
    """Retry transient storage errors (object stores drop connections); a missing file is not transient."""
    for attempt in range(tries):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(delay * 2**attempt)


class RowFetcher:
    """Reads row groups of the planned shards, checking each shard against its manifest entry once.

    Memory is bounded by an LRU of row groups (per source: shuffle_window + 2), whatever the corpus size.
    """

    def __init__(self, plan: Plan, shuffle_window: int):
        self.plan = plan
        self.warn = _Warner()
        self._files = _LRU(16 * len(plan.manifests))
        self._tables = _LRU(len(plan.manifests) * (shuffle_window + 2))

    def _open(self, src: int, shard: int):
        def make():
            handle, reason, msg = self._check(src, shard)
            if handle is None:  # warn once per shard (cached), not once per sample
                self.warn(reason, f"skipping the samples of {msg}")
            return handle, reason, msg

        return self._files.get((src, shard), make)

    def _check(self, src: int, shard: int):
        """Open a shard and compare its footer with the manifest entry: (handle, None, None) or (None, reason, msg)."""
        m = self.plan.manifests[src]
        url = m.shard_url(shard)
        info = m.shards[shard]
        fs, path = storage.url_to_fs(url)
        try:
            pf = _retry(lambda: pq.ParquetFile(fs.open(path, "rb")))
        except FileNotFoundError:
            return None, "missing_shard", f"shard {url} is missing"
        except Exception as err:  # not parquet, truncated footer...
            return None, "shard_mismatch", f"shard {url} is unreadable ({type(err).__name__}: {err})"
        md = pf.metadata
        problems = read_column_problems(pf.schema_arrow)
        if problems:
            return (
                None,
                "shard_mismatch",
                f"shard {url} has wrong columns ({'; '.join(problems)}); rebuild it with `pretrain data build`",
            )
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        expected = [
            min(info.row_group_rows, info.rows - g * info.row_group_rows) for g in range(info.row_groups)
        ]
        if sizes != expected:
            why = f"has row groups {sizes[:4]}.. ({md.num_rows} rows), manifest says {info.rows} rows in groups of {info.row_group_rows}"
            return None, "shard_mismatch", f"shard {url} does not match its manifest: it {why}"
        return (pf, threading.Lock()), None, None

    def row_group(self, src: int, shard: int, rg: int):
        """Column dict of python lists for one row group, or (None, reason, message)."""

        def make():
            handle, reason, msg = self._open(src, shard)
            if handle is None:
                return None, reason, msg
            pf, lock = handle
            try:
                with lock:  # one parquet file object is not safe for concurrent reads
                    t = _retry(lambda: pf.read_row_group(rg, columns=READ_COLUMNS))
            except Exception as err:
                url = self.plan.manifests[src].shard_url(shard)
                msg = f"shard {url} row group {rg} unreadable ({type(err).__name__}: {err})"
                self.warn("shard_mismatch", f"skipping the samples of {msg}")  # once per row group (cached)
                return None, "shard_mismatch", msg
            return {c: t.column(c).to_pylist() for c in READ_COLUMNS}, None, None

        return self._tables.get((src, shard, rg), make)


def empty_batch(n: int, views: int, size: int) -> dict:
    """Room for n rows. Images are left uninitialised (`assemble` zeroes the rows it does not decode), every
    other field starts as a padding row."""
    return {
        "images": np.empty((n, views, 3, size, size), np.uint8),
        "view_boxes": np.zeros((n, views, 5), np.float32),
        "label": np.full(n, -1, np.int64),
        "caption": [""] * n,
        "has_caption": np.zeros(n, bool),
        "source": np.full(n, -1, np.int64),
        "key": [""] * n,
        "valid": np.zeros(n, bool),
        "reason": [""] * n,  # why a row is invalid: "" (valid), "padding", or one of REASONS
        "cpu": np.zeros(n, np.float64),  # decode CPU seconds per row (for the counters)
    }


def assemble(
    fetcher: RowFetcher,
    cfg: DataConfig,
    epoch: int,
    positions: np.ndarray,
    aug_seed: int,
    out: dict | None = None,
    offset: int = 0,
) -> dict:
    """Batch for the given positions of `epoch` (positions >= epoch length become padding rows), written to
    rows offset.. of `out` (a fresh `empty_batch` when None: the Ray reader fills several steps into one
    block without copying them together). Rows not decoded get zero images."""
    plan = fetcher.plan
    t0 = time.thread_time()
    n = len(positions)
    if out is None:
        out = empty_batch(n, cfg.views, cfg.image_size)
    live = positions < plan.epoch_len
    for i in np.nonzero(~live)[0]:
        out["reason"][offset + i] = "padding"
    idx = np.nonzero(live)[0]
    src, shard, rg, row = plan.locate(epoch, positions[idx]) if idx.size else ([], [], [], [])
    for j, i in enumerate(idx):
        s, sh, g, r = int(src[j]), int(shard[j]), int(rg[j]), int(row[j])
        o = offset + i
        cols, reason, msg = fetcher.row_group(s, sh, g)
        if cols is None:  # the fetcher warned once for the whole shard / row group
            out["reason"][o] = reason
            continue
        key = cols["key"][r]
        data = cols["image"][r]
        try:
            if not data:
                raise ValueError("empty image bytes")
            rng = np.random.default_rng([aug_seed, epoch, int(positions[i] + epoch * plan.epoch_len)])
            out["images"][o], out["view_boxes"][o] = decode_views(
                data, cfg.image_size, cfg.views, cfg.augment, rng
            )
        except Exception as err:
            out["reason"][o] = "bad_image"
            url = plan.manifests[s].shard_url(sh)
            fetcher.warn(
                "bad_image",
                f"skipping sample {key!r} in shard {url}: undecodable image ({type(err).__name__}: {err})",
            )
            continue
        label = cols["label"][r]
        caption = cols["caption"][r]
        out["label"][o] = -1 if label is None else label
        out["caption"][o] = caption or ""
        out["has_caption"][o] = bool(caption)
        out["source"][o] = s
        out["key"][o] = key
        out["valid"][o] = True
    rows = slice(offset, offset + n)
    bad = offset + np.nonzero(~out["valid"][rows])[0]
    out["images"][bad] = 0
    out["view_boxes"][bad] = 0
    out["cpu"][rows] = (time.thread_time() - t0) / n
    return out


def new_counters() -> dict:
    return {"samples": 0, "batches": 0, "padding": 0, **{r: 0 for r in REASONS}, "decode_cpu_ms": 0.0}


def count(counters: dict, raw: dict) -> None:
    """Add one delivered batch to the counters (readers count on delivery, not on prefetch)."""
    counters["batches"] += 1
    counters["samples"] += int(np.asarray(raw["valid"]).sum())
    counters["decode_cpu_ms"] += float(np.asarray(raw["cpu"]).sum()) * 1000.0
    for r in raw["reason"]:
        if r:
            counters[r] += 1


def to_torch(raw: dict, views: int, normalize) -> dict:
    """The batch contract: image/image2 float32 (B,3,S,S) normalised, view_boxes (B,V,5), label int64,
    caption list[str], has_caption bool, source int64, key list[str], valid bool."""
    import torch

    images = raw["images"]
    batch = {"image": normalize(images[:, 0])}
    if views == 2:
        batch["image2"] = normalize(images[:, 1])
    batch["view_boxes"] = torch.tensor(
        np.asarray(raw["view_boxes"], np.float32)
    )  # small: copy (Ray: read-only)
    batch["label"] = torch.tensor(np.asarray(raw["label"], np.int64))
    batch["caption"] = [str(c) for c in raw["caption"]]
    batch["has_caption"] = torch.tensor(np.asarray(raw["has_caption"], bool))
    batch["source"] = torch.tensor(np.asarray(raw["source"], np.int64))
    batch["key"] = [str(k) for k in raw["key"]]
    batch["valid"] = torch.tensor(np.asarray(raw["valid"], bool))
    return batch


__all__ = [
    "BadDataWarning",
    "RowFetcher",
    "assemble",
    "count",
    "empty_batch",
    "new_counters",
    "to_torch",
    "normalizer",
    "REASONS",
]
