"""The sample order: a pure function from a global position to (source, shard, row group, row).

Why a function and not a shuffle buffer: the cursor can then be one integer (samples consumed by all ranks
together), and any number of ranks can resume from it exactly. Each epoch is a slice [e*L, (e+1)*L) of one
infinite global sequence:

* mixing: position g lies in block g // mix_block; every block holds exactly quota_s samples of source s
  (largest remainder of weight share * mix_block) in a seeded random order, so g maps to (s, k): the k-th
  draw from source s, computable without replaying the stream;
* per source, draw k is row k % n of pass k // n; a pass is a seeded permutation of the source's row groups,
  cut into windows of `shuffle_window` row groups, with rows permuted inside each window. Every row occurs
  exactly once per pass, and reading stays row-group-local.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

import numpy as np

from .schema import Manifest

_MIX, _PASS, _WINDOW = 0x4D49, 0x5041, 0x5749


class _LRU:
    """Tiny thread-safe memo (a value may be computed twice under a race; both are identical)."""

    def __init__(self, size: int):
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        value = make()
        with self.lock:
            self.data[key] = value
            while len(self.data) > self.size:
                self.data.popitem(last=False)
        return value


class SourceOrder:
    """Row order of one source, pass after pass."""

    def __init__(self, manifest: Manifest, index: int, seed: int, shuffle: bool, window: int):
        self.index, self.seed, self.shuffle, self.window = index, seed, shuffle, window
        shard, rg, rows = [], [], []
        for i, s in enumerate(manifest.shards):
            for g in range(s.row_groups):
                shard.append(i)
                rg.append(g)
                rows.append(min(s.row_group_rows, s.rows - g * s.row_group_rows))
        self.rg_shard = np.asarray(shard, np.int64)
        self.rg_index = np.asarray(rg, np.int64)
        self.rg_rows = np.asarray(rows, np.int64)
        self.n = int(self.rg_rows.sum())
        if self.n == 0:
            raise ValueError(f"source {manifest.name} ({manifest.url}) has no rows")
        self._passes = _LRU(4)
        self._windows = _LRU(64)

    def _pass(self, p: int):
        """(row-group permutation, row offset where each window starts; last entry = n)."""

        def make():
            nrg = len(self.rg_rows)
            perm = (
                np.random.default_rng([self.seed, _PASS, self.index, p]).permutation(nrg)
                if self.shuffle
                else np.arange(nrg)
            )
            rows = self.rg_rows[perm]
            ends = np.cumsum(rows)[self.window - 1 :: self.window]
            starts = (
                np.concatenate([[0], ends, [self.n]])
                if ends.size == 0 or ends[-1] != self.n
                else np.concatenate([[0], ends])
            )
            return perm, starts

        return self._passes.get(p, make)

    def _window_rows(self, p: int, w: int):
        """(rows of window w in pass p in their shuffled order as (row-group id, row) pairs)."""

        def make():
            perm, _ = self._pass(p)
            rgs = perm[w * self.window : (w + 1) * self.window]
            counts = self.rg_rows[rgs]
            rg_of_row = np.repeat(rgs, counts)
            row_in_rg = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            if self.shuffle:
                order = np.random.default_rng([self.seed, _WINDOW, self.index, p, w]).permutation(
                    len(rg_of_row)
                )
                rg_of_row, row_in_rg = rg_of_row[order], row_in_rg[order]
            return rg_of_row, row_in_rg

        return self._windows.get((p, w), make)

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw indices k -> (shard index, row group in shard, row in row group)."""
        k = np.asarray(k, np.int64)
        shard = np.empty_like(k)
        rg = np.empty_like(k)
        row = np.empty_like(k)
        passes, idx = np.divmod(k, self.n)
        for p in np.unique(passes):
            sel = np.nonzero(passes == p)[0]
            _, starts = self._pass(int(p))
            w = np.searchsorted(starts, idx[sel], side="right") - 1
            for wi in np.unique(w):
                s2 = sel[w == wi]
                rg_ids, rows = self._window_rows(int(p), int(wi))
                off = idx[s2] - starts[wi]
                shard[s2] = self.rg_shard[rg_ids[off]]
                rg[s2] = self.rg_index[rg_ids[off]]
                row[s2] = rows[off]
        return shard, rg, row


def quotas(weights: list[float], block: int) -> np.ndarray:
    """Samples per source per mixing block: largest remainder of weight share * block."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * block
    q = np.floor(exact).astype(np.int64)
    rest = block - q.sum()
    q[np.argsort(-(exact - q), kind="stable")[:rest]] += 1
    return q


class Mixer:
    """Global position g -> (source, draw index within that source)."""

    def __init__(self, weights: list[float], block: int, seed: int):
        self.block, self.seed = block, seed
        self.quota = quotas(weights, block) if len(weights) > 1 else np.asarray([block], np.int64)
        if (self.quota == 0).any():
            raise ValueError(
                f"mixing weights {weights} give some source 0 of every {block} samples: raise data.mix_block "
                f"(to at least {int(np.ceil(sum(weights) / min(weights)))}) or that source's weight"
            )
        self._blocks = _LRU(8)

    def _block(self, b: int):
        def make():
            src = np.repeat(np.arange(len(self.quota)), self.quota)
            if len(self.quota) > 1:
                src = src[np.random.default_rng([self.seed, _MIX, b]).permutation(len(src))]
            occ = np.empty(len(src), np.int64)
            for s in range(len(self.quota)):
                m = src == s
                occ[m] = np.arange(int(m.sum()))
            return src, occ

        return self._blocks.get(b, make)

    def assign(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(g, np.int64)
        blocks, off = np.divmod(g, self.block)
        src = np.empty_like(g)
        k = np.empty_like(g)
        for b in np.unique(blocks):
            sel = blocks == b
            bs, bo = self._block(int(b))
            src[sel] = bs[off[sel]]
            k[sel] = int(b) * self.quota[bs[off[sel]]] + bo[off[sel]]
        return src, k


class Plan:
    """The whole order for a list of manifests and a config: position within an epoch -> where the row lives."""

    def __init__(
        self,
        manifests: list[Manifest],
        weights: list[float],
        *,
        seed: int,
        shuffle: bool,
        shuffle_window: int,
        mix_block: int,
        samples_per_epoch: int = 0,
    ):
        self.manifests = manifests
        self.sources = [SourceOrder(m, i, seed, shuffle, shuffle_window) for i, m in enumerate(manifests)]
        self.mixer = Mixer(weights, mix_block, seed)
        self.epoch_len = samples_per_epoch or sum(s.n for s in self.sources)
        ident = {
            "seed": seed,
            "shuffle": shuffle,
            "window": shuffle_window,
            "mix_block": mix_block,
            "epoch_len": self.epoch_len,
            "quota": self.mixer.quota.tolist(),
            "sources": [[m.name, [(s.uri, s.rows, s.row_group_rows) for s in m.shards]] for m in manifests],
        }
        self.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def locate(self, epoch: int, positions: np.ndarray):
        """Positions within `epoch` -> (source, shard, row group, row) arrays."""
        g = np.asarray(positions, np.int64) + epoch * self.epoch_len
        src, k = self.mixer.assign(g)
        shard = np.empty_like(g)
        rg = np.empty_like(g)
        row = np.empty_like(g)
        for s in np.unique(src):
            sel = src == s
            shard[sel], rg[sel], row[sel] = self.sources[int(s)].locate(k[sel])
        return src, shard, rg, row
