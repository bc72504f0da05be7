"""The `data:` section of a run config: which corpora, how they are mixed, shuffled, decoded and batched.

Frozen sections with documented, range-checked fields (`pretrain.fields`, the convention of every section).
Python callers may pass lists and dicts where the fields say tuples and sections; `__post_init__` normalises
them, so both spellings load.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..fields import FieldError, Section
from ..fields import field as _doc

READERS = ("arrow", "ray")


@dataclass(frozen=True)
class SourceConfig(Section):
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
        gt=0,
    )


@dataclass(frozen=True)
class AugmentConfig(Section):
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
    hflip: float = _doc(
        0.5, "Probability of a horizontal flip per view (recorded in `view_boxes[..., 4]`).", ge=0, le=1
    )
    mean: tuple[float, float, float] = _doc(
        (0.485, 0.456, 0.406), "Per-channel normalisation mean (RGB, 0..1 scale; ImageNet by default)."
    )
    std: tuple[float, float, float] = _doc(
        (0.229, 0.224, 0.225), "Per-channel normalisation std (RGB, 0..1 scale; ImageNet by default)."
    )

    def validate(self) -> None:
        for name in ("scale", "ratio", "mean", "std"):
            self._set(name, tuple(float(v) for v in getattr(self, name)))
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise FieldError("scale", f"must be (lo, hi) with 0 < lo <= hi <= 1, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise FieldError("ratio", f"must be (lo, hi) with 0 < lo <= hi, got {self.ratio}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise FieldError("mean" if len(self.mean) != 3 else "std", "needs 3 values (RGB)")
        if any(v <= 0 for v in self.std):
            raise FieldError("std", f"must be > 0, got {self.std}")


@dataclass(frozen=True)
class DataConfig(Section):
    """Everything the data stream needs; `pretrain.data.build_stream(cfg, rank=, world_size=, seed=)` reads it."""

    sources: list[SourceConfig] = _doc(
        [SourceConfig()], "Corpora to mix: a list of {name, uri (manifest URL), weight}."
    )
    image_size: int = _doc(224, "Side S of the square output images (B, 3, S, S).", ge=1)
    views: int = _doc(
        1,
        "1: `image` only. 2: also `image2`, a second, independently augmented view of the same image.",
        choices=(1, 2),
    )
    batch_size: int = _doc(
        64,
        "Samples per batch per rank (B). Every batch has exactly B rows; padding rows have valid=False.",
        ge=1,
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
        ge=1,
    )
    mix_block: int = _doc(
        1000,
        "Mixing block: every `mix_block` consecutive samples hold exactly round(weight share * mix_block) samples of each source (largest remainder), in a seeded random order.",
        ge=1,
    )
    samples_per_epoch: int = _doc(
        0,
        "Length of one epoch of the mixed stream in samples (all ranks together). 0: the sum of the sources' rows (with one source: exactly one pass over it per epoch).",
        ge=0,
    )
    drop_last: bool = _doc(
        False,
        "True: stop the epoch at the last full global batch (the remainder is not delivered this epoch). False: the last global batch is completed with padding rows (valid=False).",
    )
    num_workers: int = _doc(
        2, "Decode threads per rank (arrow reader) or concurrent decode tasks (ray reader).", ge=0
    )
    ray_num_cpus: float = _doc(
        1.0, "Ray reader: CPUs reserved per decode actor (num_workers actors per rank).", gt=0
    )
    prefetch: int = _doc(2, "Batches decoded ahead of the consumer per rank.", ge=0)
    reader: str = _doc(
        "arrow",
        '"arrow": pyarrow + fsspec in this process (no Ray; single process and deepspeed launcher). "ray": Ray Data map_batches on the Ray cluster\'s CPU workers, same order, batches and cursor.',
        choices=READERS,
    )
    augment: AugmentConfig = _doc(AugmentConfig, "Crop/flip/normalisation parameters.")

    def validate(self) -> None:
        self._set("sources", [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources])
        if isinstance(self.augment, dict):
            self._set("augment", AugmentConfig(**self.augment))
        if not self.sources:
            raise FieldError("sources", "is empty: name at least one manifest")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise FieldError("sources", f"names must be unique, got {names}")
