"""Caption iterators over corpus manifests (the shard format of `pretrain.data`), for tokenizer training."""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def iter_captions(manifests: Sequence[str], limit: int = 0) -> Iterator[str]:
    """Non-empty captions of every shard of each manifest (URL or corpus folder), in manifest order.

    Reads only the `caption` column, one row group at a time (memory stays at one row group).
    """
    import pyarrow.parquet as pq

    from ..data import storage
    from ..data.schema import Manifest

    seen = 0
    for url in manifests:
        manifest = Manifest.load(url)
        for i in range(len(manifest.shards)):
            fs, path = storage.url_to_fs(manifest.shard_url(i))
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                for rg in range(pf.num_row_groups):
                    for caption in pf.read_row_group(rg, columns=["caption"]).column(0).to_pylist():
                        if caption:
                            yield caption
                            seen += 1
                            if limit and seen >= limit:
                                return


def label_names_of(manifests: Sequence[str]) -> list[str]:
    """Union of the manifests' label names, in first-seen order."""
    from ..data.schema import Manifest

    names: list[str] = []
    for url in manifests:
        for name in Manifest.load(url, check_shards=False).label_names or []:
            if name not in names:
                names.append(name)
    return names
