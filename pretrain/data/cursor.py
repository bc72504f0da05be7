"""The Stream contract every batch source satisfies, and the cursor the corpus readers share.

`BatchStream` is what the trainer consumes: the arrow reader (`pretrain.data.stream.Stream`), the Ray reader
(`pretrain.data.ray_reader.RayStream`) and the synthetic reader (`pretrain.data.synthetic.SyntheticStream`)
implement it, and a launcher's own stream must too. The corpus readers share `Cursor` and `CursorStream`
(its guarantee is documented in `pretrain.data.stream`); this module imports neither reader, so both can
import it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

from .config import DataConfig
from .order import Plan
from .schema import Manifest


@runtime_checkable
class BatchStream(Protocol):
    """The batches of one rank, one epoch per `iter()` (the trainer starts the next epoch itself).

    Batch schema (a dict; B = `batch_size`, S = `image_size`, V = views):
    `image` float (B, 3, S, S) normalised, view 0; `image2` (B, 3, S, S) a second augmented view when the
    data config asks for two views; `view_boxes` float (B, V, 5): each view's crop box (x0, y0, x1, y1) in
    [0, 1] coordinates of the original image and a horizontal-flip flag; `label` long (B,), -1 when the sample
    has no label; `caption` list[str] ("" when none) and `has_caption` bool (B,); `source` long (B,);
    `key` list[str]; `valid` bool (B,) (False for padding rows). The corpus readers deliver every key; the
    synthetic stream has no `image2`, `view_boxes` or `key`.

    `batch_size` and `image_size` are the one place the trainer reads B and S from (not the config):
    a launcher's stream cannot disagree with what the trainer budgets for.
    """

    @property
    def batch_size(self) -> int:
        """Rows per batch of this rank (B), padding rows included."""
        ...

    @property
    def image_size(self) -> int:
        """Side S of the square images."""
        ...

    def __iter__(self) -> Iterator[dict]: ...

    def state_dict(self) -> dict:
        """The cursor after the last delivered batch: saved with the checkpoint of the step trained on it."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def counters(self) -> dict[str, int]:
        """Cumulative counts (delivered samples, padding, skipped per reason) for `data/*` scalars."""
        ...

    def info(self) -> dict:
        """What the objective needs to know: `label_names` and `num_classes` when labelled, `source_names`."""
        ...

    def close(self) -> None:
        """Release threads/actors; the stream is not iterated afterwards."""
        ...


STATE_VERSION = 1


def make_plan(cfg: DataConfig, order_seed: int, manifests: list[Manifest] | None = None) -> Plan:
    """Load every source's manifest (failing now if one names a missing shard) and build the order."""
    if manifests is None:
        manifests = [Manifest.load(s.uri) for s in cfg.sources]
    return Plan(
        manifests,
        [s.weight for s in cfg.sources],
        seed=order_seed,
        shuffle=cfg.shuffle,
        shuffle_window=cfg.shuffle_window,
        mix_block=cfg.mix_block,
        samples_per_epoch=cfg.samples_per_epoch,
    )


def plan_info(plan: Plan) -> dict:
    """What a consumer needs to know about the corpus: class names (labels index the labelled sources'
    shared list), source names, epoch length."""
    labelled = [m.label_names for m in plan.manifests if m.label_names]
    if any(names != labelled[0] for names in labelled[1:]):
        raise ValueError(
            "labelled sources disagree on label_names: a label id would mean different classes; "
            "rebuild them with one class list or mix only one labelled source"
        )
    info = {"source_names": [m.name for m in plan.manifests], "samples_per_epoch": plan.epoch_len}
    if labelled:
        info["label_names"] = list(labelled[0])
        info["num_classes"] = len(labelled[0])
    return info


class Cursor:
    """Where the stream is: epoch and samples of that epoch consumed by all ranks together."""

    def __init__(self, plan: Plan, cfg: DataConfig, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.plan, self.cfg, self.rank, self.world_size = plan, cfg, rank, world_size
        self.epoch = 0
        self.consumed = 0

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world_size

    def steps_left(self) -> int:
        left = max(self.plan.epoch_len - self.consumed, 0)
        return left // self.global_batch if self.cfg.drop_last else -(-left // self.global_batch)

    def positions(self, start: int, step: int) -> np.ndarray:
        """This rank's positions for the step-th global batch after `start`."""
        b = self.cfg.batch_size
        first = start + step * self.global_batch + self.rank * b
        return np.arange(first, first + b, dtype=np.int64)

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "fingerprint": self.plan.fingerprint,
            "epoch_len": self.plan.epoch_len,
            "world_size": self.world_size,
            "batch_size": self.cfg.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data cursor version {state.get('version')}, expected {STATE_VERSION}")
        if state["fingerprint"] != self.plan.fingerprint:
            raise ValueError(
                "data cursor was saved for a different corpus order (manifests, weights, shuffle settings, "
                "samples_per_epoch or order seed changed): resuming would repeat or skip samples. Restore the "
                "original data config, or start the stream from scratch (do not load its state)."
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0


class CursorStream:
    """What both corpus readers share: the `BatchStream` contract over a `Cursor` (resumable position,
    counters, label names).

    Subclasses set `cfg`, `plan`, `cursor`, `_counters` and `_lock`, and implement `__iter__` (one epoch per
    call) and `close`.
    """

    cfg: DataConfig
    plan: Plan
    cursor: Cursor
    _counters: dict
    _lock: threading.Lock

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    def set_epoch(self, epoch: int) -> None:
        self.cursor.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state)

    def counters(self) -> dict[str, int]:
        """Delivered samples/batches, padding rows, skipped samples per reason, and the decode CPU time of the
        delivered batches in ms (this process, since start)."""
        with self._lock:
            return {k: int(v) for k, v in self._counters.items()}

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.cursor.steps_left()

    @property
    def label_names(self) -> list[list[str] | None]:
        """Per source (index = batch `source`): its manifest's class names, None when it has no labels."""
        return [m.label_names for m in self.plan.manifests]

    def info(self) -> dict:
        return plan_info(self.plan)
