"""The kernel build caches stay bounded: each unit keeps its most recently used entries (pretrain/ops/build_cache.py)."""

from __future__ import annotations

import os
from pathlib import Path

from pretrain.ops import build_cache, emulation


def _entry(path: Path, age_s: float, directory: bool = False) -> Path:
    if directory:
        path.mkdir(parents=True)
        stamp = path / f"{emulation.EXT_NAME}.so"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = path
    stamp.write_bytes(b"x")
    t = 1_700_000_000 - age_s
    os.utime(stamp, (t, t))
    return path


def test_prune_keeps_the_most_recently_used_per_unit(tmp_path):
    old = [_entry(tmp_path / f"dcn_bwd_bf16-{i:04x}.o", age_s=100 + i) for i in range(5)]
    other = _entry(tmp_path / "gemm_f32-abcd.o", age_s=10_000)  # a unit of its own: its only entry stays
    in_progress = _entry(tmp_path / ".dcn_bwd_bf16-ffff.123.o", age_s=50_000)  # another builder's temporary
    stranger = _entry(tmp_path / "notes.txt", age_s=50_000)

    removed = build_cache.prune(tmp_path, keep=2)

    assert sorted(removed) == sorted(old[2:])
    assert all(p.exists() for p in (*old[:2], other, in_progress, stranger))


def test_an_entry_a_build_found_counts_as_recent(tmp_path):
    oldest = _entry(tmp_path / "dcn_fwd_f16-0001.o", age_s=900)
    newer = [_entry(tmp_path / f"dcn_fwd_f16-{i:04x}.o", age_s=i) for i in range(2, 4)]
    build_cache.mark_used(oldest)

    removed = build_cache.prune(tmp_path, keep=2)

    assert oldest.exists() and removed == [newer[1]]


def test_unit_names_keep_their_dashes():
    assert build_cache.object_unit(Path("dcn_bwd_bf16-0a1b.o")) == "dcn_bwd_bf16"
    assert build_cache.object_unit(Path("my-unit-0a1b.o")) == "my-unit"
    assert build_cache.object_unit(Path(".dcn_bwd_bf16-0a1b.4242.o")) is None
    assert build_cache.object_unit(Path("README")) is None


def test_emulation_cache_prunes_objects_and_libraries(tmp_path, monkeypatch):
    """The emulation's two levels: objects per unit, libraries (a directory per key set) by their .so's use."""
    monkeypatch.setenv("PRETRAIN_DCNV3_EMU_DIR", str(tmp_path))
    keep = build_cache.KEEP_PER_UNIT
    objs = [_entry(tmp_path / "obj" / f"runtime-{i:04x}.o", age_s=i) for i in range(keep + 3)]
    libs = [_entry(tmp_path / "lib" / f"{i:020x}", age_s=i, directory=True) for i in range(2 * keep + 2)]
    linking = tmp_path / "lib" / ("f" * 20)  # created just now, its library not yet in place
    linking.mkdir()

    emulation._prune_cache()

    assert [p.exists() for p in objs] == [True] * keep + [False] * 3
    assert linking.exists()
    assert [p.exists() for p in libs] == [True] * (2 * keep - 1) + [False] * 3
