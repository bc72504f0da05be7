"""Corpus: shard schema and manifests, builders, the sample corpus, and the per-rank batch stream.

Public API: `DataConfig`, `build_stream(cfg, rank=, world_size=, seed=)`, `make_sample_corpus(out_dir, ...)`,
`Manifest`. Heavy imports (Ray, torch) happen only when a stream is built.
"""

from .config import AugmentConfig, DataConfig, SourceConfig
from .schema import Manifest


def build_stream(cfg, *, rank: int, world_size: int, seed: int):
    """See `pretrain.data.stream.build_stream`."""
    from .stream import build_stream as _build

    return _build(cfg, rank=rank, world_size=world_size, seed=seed)


def make_sample_corpus(out_dir: str, **kwargs) -> str:
    """See `pretrain.data.sample.make_sample_corpus`; returns the train manifest URL (val is its sibling)."""
    from .sample import make_sample_corpus as _make

    return _make(out_dir, **kwargs)


__all__ = ["AugmentConfig", "DataConfig", "Manifest", "SourceConfig", "build_stream", "make_sample_corpus"]
