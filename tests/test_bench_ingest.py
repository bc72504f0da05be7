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


def _exit_without_result(q):
    raise SystemExit(3)


def test_a_measuring_process_that_dies_is_an_error_not_a_hang():
    """A measuring process that dies before reporting (it did: 0 s of CPU time on a tiny run divided by zero)
    must end the benchmark with an error; waiting on its queue would hang forever."""
    import multiprocessing as mp

    from pretrain.bench.ingest import _result

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    job = ctx.Process(target=_exit_without_result, args=(q,))
    job.start()
    with pytest.raises(RuntimeError, match="died .exit code 3"):
        _result(q, [job], "bare")
    job.join()


def test_merging_runs_too_short_for_the_cpu_clock():
    """bare_busy merges its processes' results; a smoke run shorter than the CPU clock's 10 ms tick reads 0 CPU
    seconds in every process, which must give a (huge) rate, not a ZeroDivisionError (seen in CI)."""
    from pretrain.bench.ingest import _merge

    part = {
        "mode": "bare_busy",
        "views": 2,
        "samples": 40,
        "seconds": 0.008,
        "cpu_seconds": {"consumer": 0.0, "decode": 0.0, "infra": 0.0},
        "per_s": 5000.0,
        "per_core_s": 5000.0,
        "per_cpu_s": 4e7,
        "infra_share": 0.0,
        "peak_rss_mib": 500.0,
    }
    merged = _merge([part, dict(part)])
    assert merged["samples"] == 80 and merged["processes"] == 2 and merged["per_cpu_s"] > 0
