"""Where the trainer's batches come from: the corpus stream (pretrain.data) or a synthetic one.

Both satisfy the Stream contract: iterable of batch dicts (layout in `pretrain.objectives.base`),
`state_dict()` / `load_state_dict()` for the cursor, `counters()` of bad samples.
"""

from __future__ import annotations

import torch

from ..config import RunConfig


class SyntheticStream:
    """Deterministic, learnable batches: each class is a fixed colour pattern plus noise.

    Batch `i` of rank `r` depends only on (seed, r, i), so the cursor is just `i` and a resumed stream is
    identical to an uninterrupted one.
    """

    def __init__(self, batch_size: int, image_size: int, num_classes: int, seed: int = 0, rank: int = 0):
        self.batch_size, self.image_size, self.num_classes = batch_size, image_size, num_classes
        self.seed, self.rank = seed, rank
        self.index = 0
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, 3, 4, 4, generator=g)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank * 10_007 + self.index) % (2**63))
        self.index += 1
        b, s = self.batch_size, self.image_size
        label = torch.randint(0, self.num_classes, (b,), generator=g)
        base = torch.nn.functional.interpolate(self.patterns[label], size=(s, s), mode="nearest")
        image = base + 0.5 * torch.randn(b, 3, s, s, generator=g)
        return {
            "image": image,
            "label": label,
            "caption": [f"a picture of pattern {int(k)}" for k in label],
            "has_caption": torch.ones(b, dtype=torch.bool),
            "source": torch.zeros(b, dtype=torch.long),
            "valid": torch.ones(b, dtype=torch.bool),
        }

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def counters(self) -> dict[str, int]:
        return {}

    def info(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "label_names": [f"pattern {k}" for k in range(self.num_classes)],
        }


def build_default_stream(cfg: RunConfig, rank: int, world_size: int):
    """The stream named by the config: synthetic when `synthetic.enabled`, else `pretrain.data.build_stream`."""
    if cfg.synthetic.enabled:
        s = cfg.synthetic
        classes = s.num_classes or cfg.model.num_classes or 10
        return SyntheticStream(s.batch_size, s.image_size, classes, seed=cfg.seed, rank=rank)
    try:
        from pretrain.data import build_stream
    except ImportError as err:
        raise RuntimeError(
            "the corpus stream (pretrain.data.build_stream) is not available in this checkout; "
            "set synthetic.enabled=true to train on synthetic batches"
        ) from err
    return build_stream(cfg.data, rank=rank, world_size=world_size, seed=cfg.seed)


def stream_info(stream, cfg: RunConfig) -> dict:
    """`data_info` for build_objective: what the stream knows about labels (and a caption sampler)."""
    info: dict = {}
    fn = getattr(stream, "info", None)
    if callable(fn):
        info.update(fn())
    names = getattr(stream, "label_names", None)
    if "label_names" not in info and isinstance(names, list) and names:
        # one list per source (None for unlabelled sources): label ids index the first labelled source's names
        first = next((n for n in names if n), None) if isinstance(names[0], (list, type(None))) else names
        if first:
            info["label_names"] = list(first)
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
    from pretrain.data import build_stream

    stream = build_stream(cfg.data, rank=0, world_size=1, seed=cfg.seed)
    try:
        for i, batch in enumerate(stream):
            if i >= max_batches:
                break
            yield from (c for c in batch.get("caption", ()) if c)
    finally:
        close = getattr(stream, "close", None)
        if callable(close):
            close()


def micro_batch_size(cfg: RunConfig) -> int:
    if cfg.synthetic.enabled:
        return cfg.synthetic.batch_size
    return int(getattr(cfg.data, "batch_size", 1))


def image_size(cfg: RunConfig) -> int:
    if cfg.synthetic.enabled:
        return cfg.synthetic.image_size
    return int(getattr(cfg.data, "image_size", 224))
