"""Zero-shot evaluation plumbing: the held-out split's stream, and one call the trainer can make.

    results = zero_shot(objective, run_cfg, rank=r, world_size=w)   # {"zeroshot/top1": ..., "zeroshot/top5": ...}

`objective.evaluate(batches, label_names=..., max_batches=...)` is the hook; this module only builds the
batches: the `objective.zero_shot.split` manifest (or, when empty, the `val/` sibling of the first data
source, the layout `pretrain data sample` writes), resized and centre-cropped (no random augmentation, one
view), each rank reading its own slice of the split (the counts are summed across ranks in `evaluate`).
"""

from __future__ import annotations

import dataclasses

from ..data import storage


def eval_split(run_cfg) -> str:
    """The held-out split's manifest URL."""
    split = run_cfg.objective.zero_shot.split
    if split:
        return split
    first = run_cfg.data.sources[0].uri
    folder = storage.dirname(first if first.endswith(".json") else storage.join(first, "manifest.json"))
    return storage.join(storage.dirname(folder), "val", "manifest.json")


def eval_data_config(data_cfg, split: str, batch_size: int | None = None):
    """The run's data section pointed at `split`: one view, no shuffle, deterministic resize + centre crop."""
    from ..data.config import AugmentConfig, SourceConfig

    augment = (
        dataclasses.replace(data_cfg.augment, random=False)
        if data_cfg.augment
        else AugmentConfig(random=False)
    )
    return dataclasses.replace(
        data_cfg,
        sources=[SourceConfig(name="zeroshot", uri=split, weight=1.0)],
        views=1,
        shuffle=False,
        drop_last=False,
        samples_per_epoch=0,
        batch_size=batch_size or data_cfg.batch_size,
        reader="arrow",
        augment=augment,
    )


def zero_shot(
    objective, run_cfg, *, rank: int = 0, world_size: int = 1, split: str | None = None, prepare=None
) -> dict:
    """Run `objective.evaluate` on the held-out split (every rank must call it: the counts are all-reduced).

    `prepare(batch) -> batch` moves each batch where the model lives (the trainer passes its device and
    compute-dtype mapping); without it batches stay as the reader made them (CPU, float32)."""
    from ..data import build_stream
    from ..data.schema import Manifest

    split = split or eval_split(run_cfg)
    names = Manifest.load(split, check_shards=False).label_names or None
    stream = build_stream(
        eval_data_config(run_cfg.data, split), rank=rank, world_size=world_size, seed=run_cfg.seed
    )
    try:
        batches = stream if prepare is None else (prepare(batch) for batch in stream)
        return objective.evaluate(
            batches, label_names=names, max_batches=run_cfg.objective.zero_shot.max_batches
        )
    finally:
        stream.close()
