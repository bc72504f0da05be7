"""`pretrain bench ingest` runs end to end on a tiny generated corpus and prints its table (a smoke test of the
command; the figures themselves belong in BENCHMARKS.md, not in assertions)."""

from __future__ import annotations

import pytest

from pretrain.cli import main


@pytest.mark.slow
def test_bench_ingest_smoke(tmp_path, capsys):
    args = [
        "bench",
        "ingest",
        "--workdir",
        str(tmp_path),
        "--num",
        "48",
        "--samples",
        "48",
        "--image-px",
        "96",
        "--size",
        "64",
    ]
    args += [
        "--batch-size",
        "8",
        "--warmup",
        "1",
        "--repeat",
        "1",
        "--views",
        "2",
        "--modes",
        "bare",
        "bare_busy",
        "arrow",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| 2 | bare |" in out and "| 2 | arrow |" in out
    assert "| 2 | bare_busy (2 at once) |" in out  # two bare loops at once, merged into one row
