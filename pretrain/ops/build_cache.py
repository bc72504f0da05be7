"""Keep the content-keyed build caches bounded: the kernel check's objects (build.py) and the emulation's objects
and libraries (emulation.py).

Both caches name an entry by a hash of everything it depends on, so every kernel edit adds new entries and leaves
the old ones behind. Unpruned, they grew to about 4 GB over a few days of kernel work (a CI runner that keeps its
home directory grows the same way). A build marks every entry it finds as used. After a build that added entries,
each unit keeps its most recently used `keep` entries, and the rest are deleted. Mutants and sanitizer builds are
entries of their own, so the default keeps a few of each per unit.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

KEEP_PER_UNIT = 12


def mark_used(path: Path) -> None:
    """A build found `path` in the cache: it counts as the unit's most recently used entry."""
    try:
        os.utime(path)
    except OSError:  # pruned by a concurrent build meanwhile: the caller rebuilds or fails on its own terms
        pass


def object_unit(entry: Path) -> str | None:
    """`<unit>-<key>.o` -> unit; None for anything else (a builder's temporary file starts with a dot)."""
    if entry.name.startswith(".") or entry.suffix != ".o" or "-" not in entry.stem:
        return None
    return entry.stem.rsplit("-", 1)[0]


def _last_used(entry: Path, stamp: Callable[[Path], Path]) -> float:
    """When `entry` was last used: its stamp's time, else (a library still being linked) the entry's own."""
    for path in (stamp(entry), entry):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0


def prune(
    directory: Path,
    unit_of: Callable[[Path], str | None] = object_unit,
    keep: int = KEEP_PER_UNIT,
    stamp: Callable[[Path], Path] = lambda entry: entry,
) -> list[Path]:
    """Delete all but the `keep` most recently used entries of each unit in `directory` (files, or directories
    whose use is recorded on `stamp(entry)`); -> what was deleted. Entries `unit_of` gives None are left alone."""
    if not directory.is_dir():
        return []
    groups: dict[str, list[Path]] = defaultdict(list)
    for entry in directory.iterdir():
        unit = unit_of(entry)
        if unit is not None:
            groups[unit].append(entry)
    removed = []
    for entries in groups.values():
        entries.sort(key=lambda e: _last_used(e, stamp), reverse=True)
        for old in entries[keep:]:
            try:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            except OSError:  # another build deleted or is using it: leave it for the next prune
                continue
            removed.append(old)
    return removed
