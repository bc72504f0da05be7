"""The Ray Data reader: decode + augment on the Ray cluster's CPU workers, same batches as the arrow reader.

Why each rank builds its own, pre-split dataset instead of Ray Train's `get_dataset_shard` (streaming_split):
Ray's split hands blocks to whichever worker asks first, so which rank saw which sample is not recorded and
a mid-epoch cursor could not be exact. Here `rank_dataset` is a Ray Dataset of exactly this rank's
remaining batches (global step t -> positions of `pretrain.data.order`), read with column pruning
(key/image/caption/label) from row groups inside `map_batches` actors that keep a bounded row-group cache.
`RayStream` iterates it in order (`preserve_order`) and keeps the same cursor as the arrow reader, so the
guarantee of `pretrain.data.stream` holds unchanged with Ray, including resuming on a different world size,
and a run may even switch readers between restarts.

Each Ray task decodes several consecutive steps into one block (`steps_per_block`): Ray Data's driver spends
CPU per task and per block (its scheduling loop, metrics, the batch iterator's threads), which with one step
of 64 two-view samples per block cost 0.22 ms per sample in the training process; four steps per block
halve it (BENCHMARKS.md, ingest). Blocks stay whole multiples of the batch, so `iter_batches` still yields
one step per batch, in order.

With Ray Train: call `build_stream(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
seed=...)` (cfg.reader="ray") inside `train_loop_per_worker`; pass no `datasets=` to the trainer.
Ray is imported only here.
"""

from __future__ import annotations

import copy
import threading
import time

import numpy as np

from .batch import RowFetcher, assemble, count, empty_batch, new_counters, normalizer, to_torch
from .config import DataConfig
from .cursor import Cursor, CursorStream, make_plan
from .order import Plan
from .schema import Manifest

# A block holds about this many rows (several steps when batches are small) and at most this many image bytes.
ROWS_PER_BLOCK = 256
MAX_BLOCK_BYTES = 96 * 2**20
# RayStream reads an epoch as consecutive datasets of at most this many blocks (~20 min of one actor's work).
BLOCKS_PER_DATASET = 4096


def steps_per_block(cfg: DataConfig) -> int:
    """Steps decoded per Ray task: enough rows to amortise the driver's per-block cost, bounded in bytes."""
    step_bytes = cfg.batch_size * cfg.views * 3 * cfg.image_size**2
    return max(1, min(-(-ROWS_PER_BLOCK // cfg.batch_size), MAX_BLOCK_BYTES // step_bytes))


def block_layout(cfg: DataConfig, steps: int) -> tuple[int, int]:
    """(steps per block, blocks) for `steps` remaining steps; the last block may be short."""
    per_block = min(steps_per_block(cfg), max(steps, 1))
    return per_block, -(-steps // per_block)


class _DecodeSteps:
    """map_batches actor: block ids -> this rank's rows of `per_block` consecutive steps (uint8 views, boxes,
    targets, reasons), B rows per step.

    The rows' `cpu` is this actor's whole process CPU since its previous block (decode, plus Ray's own work of
    storing the previous block and running the task), so the reader's decode counter is what the decode
    workers really cost, not only the decoding."""

    def __init__(
        self,
        cfg: DataConfig,
        manifests: list[Manifest],
        order_seed: int,
        aug_seed: int,
        rank: int,
        world_size: int,
        epoch: int,
        start: int,
        steps: int,
        per_block: int,
    ):
        self.cfg, self.aug_seed, self.epoch, self.start = cfg, aug_seed, epoch, start
        self.steps, self.per_block = steps, per_block
        self.plan = make_plan(cfg, order_seed, manifests)
        self.cursor = Cursor(self.plan, cfg, rank, world_size)
        self.fetcher = RowFetcher(self.plan, cfg.shuffle_window)
        self._cpu_mark = time.process_time()

    def __call__(self, batch: dict) -> dict:
        k, b = self.per_block, self.cfg.batch_size
        steps = [t for i in batch["id"] for t in range(int(i) * k, min((int(i) + 1) * k, self.steps))]
        out = empty_batch(len(steps) * b, self.cfg.views, self.cfg.image_size)
        for j, t in enumerate(steps):  # each step straight into its rows of the block: no concatenation
            positions = self.cursor.positions(self.start, t)
            assemble(self.fetcher, self.cfg, self.epoch, positions, self.aug_seed, out=out, offset=j * b)
        for key in ("caption", "key", "reason"):
            out[key] = np.asarray(out[key], dtype=object)
        now = time.process_time()
        out["cpu"][:] = (now - self._cpu_mark) / max(len(out["cpu"]), 1)
        self._cpu_mark = now
        return out


def rank_dataset(
    cfg: DataConfig,
    plan: Plan,
    cursor: Cursor,
    *,
    order_seed: int,
    aug_seed: int,
    first_block: int = 0,
    max_blocks: int | None = None,
):
    """Ray Dataset of one rank's remaining batches of the cursor's epoch, in order, B rows per step
    (`steps_per_block` steps per block); with `first_block`/`max_blocks`, only that window of blocks.

    The block ids are the dataset's input rows, one per input block (`from_items`), so every Ray task decodes
    exactly one block. With fewer, larger input blocks (as `ray.data.range` makes) one task would decode many
    blocks in a row, and since the output keeps task order a second actor's finished blocks would wait for
    the first actor's whole task: the actors would take turns instead of working side by side."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the cursor counts delivered steps in order
    steps = cursor.steps_left()
    per_block, blocks = block_layout(cfg, steps)
    last = blocks if max_blocks is None else min(blocks, first_block + max_blocks)
    ids = [{"id": i} for i in range(first_block, last)]
    ds = ray.data.from_items(ids, override_num_blocks=max(1, len(ids)))
    return ds.map_batches(
        _DecodeSteps,
        batch_size=1,
        fn_constructor_kwargs=dict(
            cfg=cfg,
            manifests=plan.manifests,
            order_seed=order_seed,
            aug_seed=aug_seed,
            rank=cursor.rank,
            world_size=cursor.world_size,
            epoch=cursor.epoch,
            start=cursor.consumed,
            steps=steps,
            per_block=per_block,
        ),
        compute=ray.data.ActorPoolStrategy(size=max(1, cfg.num_workers)),
        num_cpus=cfg.ray_num_cpus,
    )


def ray_dataset(cfg: DataConfig, *, rank: int, world_size: int, seed: int, state: dict | None = None):
    """The pre-split Ray Dataset of one rank: its remaining batches of the epoch in `state` (a cursor from
    `state_dict()`; None: the start). Rows carry uint8 `images` (V, 3, S, S) and the batch fields; to get the
    batch dict with the cursor kept for you, iterate `RayStream` (build_stream with reader="ray") instead."""
    order_seed = cfg.shuffle_seed if cfg.shuffle_seed is not None else seed
    plan = make_plan(cfg, order_seed)
    cursor = Cursor(plan, cfg, rank, world_size)
    if state is not None:
        cursor.load_state_dict(state)
    return rank_dataset(cfg, plan, cursor, order_seed=order_seed, aug_seed=seed)


class RayStream(CursorStream):
    """Same interface and cursor as `pretrain.data.stream.Stream`; the decoding runs in Ray actors."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, seed: int):
        self.cfg, self.seed = cfg, seed
        self.order_seed = cfg.shuffle_seed if cfg.shuffle_seed is not None else seed
        self.plan = make_plan(cfg, self.order_seed)
        self.cursor = Cursor(self.plan, cfg, rank, world_size)
        self.normalize = normalizer(cfg.augment)
        self._counters = new_counters()
        self._lock = threading.Lock()

    def datasets(self):
        """Ray Datasets of this rank's remaining batches from the cursor, in windows of at most
        BLOCKS_PER_DATASET blocks: the block ids of a window are created up front (`from_items`), so a
        window bounds that cost; each window starts its own decode actors (seconds, per many minutes)."""
        # the windows count blocks from the cursor as it is now; iterating them moves the cursor
        at_start = copy.copy(self.cursor)
        _, blocks = block_layout(self.cfg, at_start.steps_left())
        for first in range(0, blocks, BLOCKS_PER_DATASET):
            yield rank_dataset(
                self.cfg,
                self.plan,
                at_start,
                order_seed=self.order_seed,
                aug_seed=self.seed,
                first_block=first,
                max_blocks=BLOCKS_PER_DATASET,
            )

    def __iter__(self):
        c = self.cursor
        epoch, start = c.epoch, c.consumed
        t = 0
        for ds in self.datasets():
            batches = ds.iter_batches(
                batch_size=self.cfg.batch_size,
                batch_format="numpy",
                prefetch_batches=max(1, self.cfg.prefetch),
            )
            for raw in batches:
                batch = to_torch(raw, self.cfg.views, self.normalize)
                count(self._counters, raw)
                t += 1
                c.consumed = min(start + t * c.global_batch, max(self.plan.epoch_len, start))
                yield batch
        c.epoch, c.consumed = epoch + 1, 0

    def close(self) -> None:
        pass


def read_corpus(manifest_url: str, columns: list[str] | None = None):
    """Whole corpus as a Ray Dataset via `read_parquet` with column pruning (for bulk jobs: statistics,
    tokenizer training, re-sharding). Training uses `rank_dataset`, whose order is exact and resumable."""
    import ray.data

    from . import storage

    m = Manifest.load(manifest_url)
    urls = [m.shard_url(i) for i in range(len(m.shards))]
    fs, _ = storage.url_to_fs(urls[0])
    paths = [storage.url_to_fs(u)[1] for u in urls]
    return ray.data.read_parquet(paths, filesystem=fs, columns=columns)
