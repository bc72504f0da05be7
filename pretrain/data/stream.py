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

from .batch import RowFetcher, assemble, count, new_counters, normalizer, to_torch
from .config import DataConfig
from .cursor import Cursor, CursorStream, make_plan
from .order import Plan


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
