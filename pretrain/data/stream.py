"""The per-rank batch stream and its cursor (plain pyarrow + fsspec reader; no Ray).

Cursor guarantee (also in the README): the state is (epoch, consumed), where `consumed` counts the samples
of the epoch's global order delivered to all ranks together; every rank saves the same value because ranks
step in lockstep. Global step t covers positions [c0 + t*B*W, c0 + (t+1)*B*W) from the resume point c0,
rank r taking the r-th slice of B. Restoring a state saved after any number of whole steps, with any world
size W' and batch size B', delivers each position of the epoch exactly once across all ranks (those below
`consumed` before the restart, the others after it), provided the manifests, weights, shuffle settings and
order seed are unchanged (checked by a fingerprint). Bad rows and the end-of-epoch tail become padding rows
(valid=False) in place, so they never shift the order; with drop_last the tail past the last full global
batch is not delivered in that epoch. Augmentations are seeded by (run seed, epoch, position): a resumed run
also sees the same crops.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .batch import RowFetcher, assemble, count, new_counters, normalizer, to_torch
from .config import DataConfig
from .order import Plan
from .schema import Manifest

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


def stream_info(plan: Plan) -> dict:
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
    """The contract both readers share (the engine relies on it): the resumable cursor, counters, label names.

    Subclasses set `plan`, `cursor`, `_counters` and `_lock`, and implement `__iter__` (one epoch per call).
    """

    plan: Plan
    cursor: Cursor

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
        return stream_info(self.plan)


class Stream(CursorStream):
    """Batches of one rank, in the global order; iterate once per epoch (it advances the epoch at the end).

    `state_dict()` after a delivered batch includes that batch; save it with the checkpoint of the step that
    trained on it.
    """

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, seed: int, plan: Plan | None = None):
        self.cfg = cfg
        self.seed = seed
        self.plan = plan or make_plan(cfg, cfg.shuffle_seed if cfg.shuffle_seed is not None else seed)
        self.cursor = Cursor(self.plan, cfg, rank, world_size)
        self.fetcher = RowFetcher(self.plan, cfg.shuffle_window)
        self.normalize = normalizer(cfg.augment)
        self._counters = new_counters()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # --- iteration ------------------------------------------------------------------------------------------
    def _make(self, epoch: int, start: int, step: int) -> dict:
        return assemble(self.fetcher, self.cfg, epoch, self.cursor.positions(start, step), self.seed)

    def __iter__(self):
        c = self.cursor
        epoch, start, steps = c.epoch, c.consumed, c.steps_left()
        ahead = max(self.cfg.prefetch, 1)
        if self.cfg.num_workers > 0 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.cfg.num_workers, thread_name_prefix="pretrain-data")
        pending = {}
        try:
            for t in range(steps):
                if self._pool is None:
                    raw = self._make(epoch, start, t)
                else:
                    for u in range(t, min(t + ahead + 1, steps)):
                        if u not in pending:
                            pending[u] = self._pool.submit(self._make, epoch, start, u)
                    raw = pending.pop(t).result()
                batch = to_torch(raw, self.cfg.views, self.normalize)
                self._count(raw)
                c.consumed = min(start + (t + 1) * c.global_batch, max(self.plan.epoch_len, start))
                yield batch
            c.epoch, c.consumed = epoch + 1, 0
        finally:
            for f in pending.values():
                f.cancel()

    def _count(self, raw: dict) -> None:
        with self._lock:
            count(self._counters, raw)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def build_stream(cfg: DataConfig, *, rank: int, world_size: int, seed: int):
    """The data stream of one rank: `cfg.reader` "arrow" (this process) or "ray" (Ray Data workers).

    Both yield the same batches in the same order and share the cursor semantics documented in this module.
    """
    if cfg.reader == "ray":
        from .ray_reader import RayStream

        return RayStream(cfg, rank=rank, world_size=world_size, seed=seed)
    return Stream(cfg, rank=rank, world_size=world_size, seed=seed)
