"""The `data:` section of a run config: which corpora, how they are mixed, shuffled, decoded and batched.

A plain dataclass of simple types (the engine's schema embeds it and rejects unknown keys); each field carries its
documentation in `metadata["doc"]`, which `pretrain train --describe-config` prints. YAML gives lists
and dicts where the fields say tuples and dataclasses; `__post_init__` coerces them, so both spellings load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

READERS = ("arrow", "ray")


def _doc(default, doc: str, factory: bool = False):
    """A field with its documentation in `metadata["doc"]` (what `pretrain train --describe-config` prints)."""
    if factory:
        return field(default_factory=default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class SourceConfig:
    """One corpus in the mixture."""

    name: str = _doc(
        "sample",
        "Short name, used in counters and logs; the batch's `source` column is this source's index in `sources`.",
    )
    uri: str = _doc(
        "data/sample/train/manifest.json",
        "Manifest URL (plain path, file://, s3://, gs://: anything fsspec opens); shard URIs in it are relative to it.",
    )
    weight: float = _doc(
        1.0,
        "Relative mixing weight: this source's share of the stream is weight / sum(weights), exact per block of `mix_block` samples.",
    )


@dataclass
class AugmentConfig:
    """Per-view augmentation: random resized crop + horizontal flip (training), or resize + center crop (eval)."""

    random: bool = _doc(
        True,
        "True: random resized crop and flip (training). False: shorter side to image_size, center crop, no flip.",
    )
    scale: tuple[float, float] = _doc(
        (0.08, 1.0), "Random resized crop: range of the crop's area as a fraction of the image's area."
    )
    ratio: tuple[float, float] = _doc(
        (3.0 / 4.0, 4.0 / 3.0), "Random resized crop: range of the crop's aspect ratio (width / height)."
    )
    hflip: float = _doc(0.5, "Probability of a horizontal flip per view (recorded in `view_boxes[..., 4]`).")
    mean: tuple[float, float, float] = _doc(
        (0.485, 0.456, 0.406), "Per-channel normalisation mean (RGB, 0..1 scale; ImageNet by default)."
    )
    std: tuple[float, float, float] = _doc(
        (0.229, 0.224, 0.225), "Per-channel normalisation std (RGB, 0..1 scale; ImageNet by default)."
    )

    def __post_init__(self):
        self.scale = tuple(float(v) for v in self.scale)
        self.ratio = tuple(float(v) for v in self.ratio)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"augment.scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"augment.ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("augment.mean and augment.std need 3 values (RGB)")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"augment.hflip is a probability, got {self.hflip}")


@dataclass
class DataConfig:
    """Everything the data stream needs; `pretrain.data.build_stream(cfg, rank=, world_size=, seed=)` reads it."""

    sources: list[SourceConfig] = _doc(
        lambda: [SourceConfig()],
        "Corpora to mix: a list of {name, uri (manifest URL), weight}.",
        factory=True,
    )
    image_size: int = _doc(224, "Side S of the square output images (B, 3, S, S).")
    views: int = _doc(
        1, "1: `image` only. 2: also `image2`, a second, independently augmented view of the same image."
    )
    batch_size: int = _doc(
        64, "Samples per batch per rank (B). Every batch has exactly B rows; padding rows have valid=False."
    )
    shuffle: bool = _doc(
        True,
        "Seeded shuffling of row groups and of rows within a window of row groups. False: manifest order.",
    )
    shuffle_seed: int | None = _doc(
        None,
        "Seed of the sample order. None: use the run seed given to build_stream. Fix it to keep the order while changing the run seed (augmentations follow the run seed).",
    )
    shuffle_window: int = _doc(
        8,
        "Rows are shuffled within windows of this many row groups (after a shuffle of all row groups). Larger is a better shuffle; each rank's read amplification is at most min(shuffle_window, world_size) and each rank holds at most shuffle_window + 2 row groups per source in memory.",
    )
    mix_block: int = _doc(
        1000,
        "Mixing block: every `mix_block` consecutive samples hold exactly round(weight share * mix_block) samples of each source (largest remainder), in a seeded random order.",
    )
    samples_per_epoch: int = _doc(
        0,
        "Length of one epoch of the mixed stream in samples (all ranks together). 0: the sum of the sources' rows (with one source: exactly one pass over it per epoch).",
    )
    drop_last: bool = _doc(
        False,
        "True: stop the epoch at the last full global batch (the remainder is not delivered this epoch). False: the last global batch is completed with padding rows (valid=False).",
    )
    num_workers: int = _doc(
        2, "Decode threads per rank (arrow reader) or concurrent decode tasks (ray reader)."
    )
    ray_num_cpus: float = _doc(
        1.0, "Ray reader: CPUs reserved per decode actor (num_workers actors per rank)."
    )
    prefetch: int = _doc(2, "Batches decoded ahead of the consumer per rank.")
    reader: str = _doc(
        "arrow",
        '"arrow": pyarrow + fsspec in this process (no Ray; single process and deepspeed launcher). "ray": Ray Data map_batches on the Ray cluster\'s CPU workers, same order, batches and cursor.',
    )
    augment: AugmentConfig = _doc(AugmentConfig, "Crop/flip/normalisation parameters.", factory=True)

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        if not self.sources:
            raise ValueError("data.sources is empty: name at least one manifest")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names must be unique, got {names}")
        if any(s.weight <= 0 for s in self.sources):
            raise ValueError("data.sources weights must be > 0 (remove a source instead of weighting it 0)")
        if self.views not in (1, 2):
            raise ValueError(f"data.views must be 1 or 2, got {self.views}")
        if self.reader not in READERS:
            raise ValueError(f"data.reader must be one of {READERS}, got {self.reader!r}")
        for name in ("image_size", "batch_size", "shuffle_window", "mix_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1")
        if self.ray_num_cpus <= 0:
            raise ValueError("data.ray_num_cpus must be > 0")
        if self.num_workers < 0 or self.prefetch < 0 or self.samples_per_epoch < 0:
            raise ValueError("data.num_workers, data.prefetch and data.samples_per_epoch must be >= 0")
