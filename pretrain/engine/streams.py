"""Where the trainer's batches come from: the config's stream (the corpus or the synthetic one).

Every stream satisfies `pretrain.data.cursor.BatchStream`; this module only picks one from a `RunConfig` and
turns its `info()` into the objective's `data_info`.
"""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from ..data import build_stream
from ..data.cursor import BatchStream


def build_default_stream(cfg: RunConfig, rank: int, world_size: int) -> BatchStream:
    """The stream named by the config: synthetic when `synthetic.enabled`, else `pretrain.data.build_stream`."""
    if cfg.synthetic.enabled:
        from ..data.synthetic import SyntheticStream

        s = cfg.synthetic
        classes = s.num_classes or cfg.model.num_classes or 10
        return SyntheticStream(s.batch_size, s.image_size, classes, seed=cfg.seed, rank=rank)
    try:
        return build_stream(cfg.data, rank=rank, world_size=world_size, seed=cfg.seed)
    except FileNotFoundError as err:  # a manifest or shard a source names (the message names the file)
        raise ConfigError(f"data.sources: {err}") from None


def stream_info(stream: BatchStream, cfg: RunConfig) -> dict:
    """`data_info` for build_objective: what the stream knows about labels (and a caption sampler)."""
    info = dict(stream.info())
    if "num_classes" not in info:
        if info.get("label_names"):
            info["num_classes"] = len(info["label_names"])
        elif cfg.model.num_classes > 0:
            info["num_classes"] = cfg.model.num_classes
    if not cfg.synthetic.enabled:
        info.setdefault("captions_iter", lambda: _captions(cfg))
    return info


def _captions(cfg: RunConfig, max_batches: int = 50):
    """Captions of the first batches of a fresh single-rank stream (tokenizer training on small corpora)."""
    stream = build_stream(cfg.data, rank=0, world_size=1, seed=cfg.seed)
    try:
        for i, batch in enumerate(stream):
            if i >= max_batches:
                break
            yield from (c for c in batch.get("caption", ()) if c)
    finally:
        stream.close()
