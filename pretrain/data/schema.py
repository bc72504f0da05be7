"""Shard schema and manifest: what a corpus is on storage.

A corpus is a folder of Parquet shards plus `manifest.json` (shard URIs relative to the manifest, row counts,
row-group size, label names, stats). The reader plans the whole sample order from the manifest alone, so it
never lists storage or opens a shard to know where sample i lives.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # unique within the corpus
        pa.field("image", pa.binary(), nullable=False),  # encoded (JPEG/PNG/WebP) bytes as fetched
        pa.field("caption", pa.string()),  # null when the sample only has a label
        pa.field("label", pa.int64()),  # index into the manifest's label_names; null when caption-only
        pa.field("source", pa.string()),  # where the sample came from (dataset / url host / folder)
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("meta", pa.string()),  # free-form JSON (url, licence, attributes...)
    ]
)
# columns the training reader needs (column pruning: width/height/meta are never read while training)
READ_COLUMNS = ["key", "image", "caption", "label"]


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


# what a reader accepts per read column (SHARD_SCHEMA's type, or one that converts to it without a guess);
# an all-null caption/label column may be stored with the null type
_READ_TYPES = {
    "key": ("string", _is_text),
    "image": ("binary", _is_bytes),
    "caption": ("string", lambda t: _is_text(t) or pa.types.is_null(t)),
    "label": (
        "int64",
        lambda t: (pa.types.is_integer(t) and not pa.types.is_uint64(t)) or pa.types.is_null(t),
    ),
}


def read_column_problems(schema: pa.Schema) -> list[str]:
    """Why a shard's read columns cannot be taken as they are: missing columns and wrong types, one
    `column: found, expected` phrase each (empty when the shard is fine).

    Checked when a shard is opened: a class-name string or a float `label`, an int `key` or a binary
    `caption` would otherwise crash the batch assembly or be silently converted row by row.
    """
    problems = []
    for name in READ_COLUMNS:
        expected, ok = _READ_TYPES[name]
        index = schema.get_field_index(name)
        if index < 0:
            problems.append(f"{name}: missing")
        elif not ok(schema.field(index).type):
            problems.append(f"{name}: {schema.field(index).type}, expected {expected}")
    return problems


@dataclass
class ShardInfo:
    uri: str
    """Shard URL, relative to the manifest's folder unless absolute."""
    rows: int
    row_group_rows: int
    """Rows per row group (the last one may be shorter): row group g holds rows [g*rgr, (g+1)*rgr)."""
    bytes: int = 0

    @property
    def row_groups(self) -> int:
        return -(-self.rows // self.row_group_rows) if self.rows else 0


@dataclass
class Manifest:
    name: str
    shards: list[ShardInfo]
    label_names: list[str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    url: str = ""
    """Where it was loaded from (not saved)."""

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def shard_url(self, i: int) -> str:
        return storage.resolve(storage.dirname(self.url), self.shards[i].uri)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("url")
        d["num_rows"] = self.num_rows
        d["columns"] = SHARD_SCHEMA.names
        return json.dumps(d, indent=1)

    def save(self, url: str) -> str:
        """Atomically write the manifest (readers never see a half-written one)."""
        storage.write_bytes_atomic(url, self.to_json().encode())
        self.url = url
        return url

    @classmethod
    def load(cls, url: str, check_shards: bool = True) -> Manifest:
        """Read a manifest; with check_shards, fail now (not mid-run) if a shard it names is missing."""
        if not url.endswith(".json"):
            url = storage.join(url, MANIFEST_NAME)
        try:
            raw = json.loads(storage.read_bytes(url))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"corpus manifest {url} does not exist: build it with `pretrain data build` "
                f"(or `pretrain data sample` for the sample corpus) or fix the source's uri"
            ) from None
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{url}: schema_version {version}, this reader understands {SCHEMA_VERSION}")
        m = cls(
            name=raw["name"],
            shards=[ShardInfo(**s) for s in raw["shards"]],
            label_names=raw.get("label_names"),
            stats=raw.get("stats", {}),
            meta=raw.get("meta", {}),
            url=url,
        )
        if check_shards:
            m.check_shards()
        return m

    def check_shards(self) -> None:
        """Raise FileNotFoundError naming every missing shard (one listing per folder, not one call per shard)."""
        by_dir: dict[str, list[str]] = {}
        for i in range(len(self.shards)):
            u = self.shard_url(i)
            by_dir.setdefault(storage.dirname(u), []).append(u)
        missing = []
        for d, urls in by_dir.items():
            fs, path = storage.url_to_fs(d)
            try:
                present = {p.rstrip("/") for p in fs.ls(path, detail=False)}
            except FileNotFoundError:
                present = set()
            for u in urls:
                if storage.url_to_fs(u)[1] not in present:
                    missing.append(u)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"manifest {self.url} names {len(missing)} missing shard(s): {shown}. Copy the shards next to "
                f"the manifest, or rebuild the corpus with `pretrain data build` (it rewrites the manifest)."
            )


def empty_columns() -> dict[str, list]:
    return {name: [] for name in SHARD_SCHEMA.names}


def write_shard(url: str, columns: dict[str, list], row_group_rows: int) -> ShardInfo:
    """Write one Parquet shard (images uncompressed: they already are; text zstd) and describe it."""
    table = pa.Table.from_pydict(columns, schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    compression = {name: ("none" if name == "image" else "zstd") for name in SHARD_SCHEMA.names}
    pq.write_table(table, buf, row_group_size=row_group_rows, compression=compression)
    data = buf.getvalue()
    storage.write_bytes_atomic(url, data)
    return ShardInfo(
        uri=url.rsplit("/", 1)[-1], rows=table.num_rows, row_group_rows=row_group_rows, bytes=len(data)
    )
