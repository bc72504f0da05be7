"""`pretrain bench dcn` without a GPU: a one-line refusal, or a reference-only smoke run with --allow-cpu."""

from __future__ import annotations

import pytest
import torch

from pretrain.bench import dcn
from pretrain.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_refuses_on_cpu_with_one_line(capsys):
    assert main(["bench", "dcn"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs a CUDA GPU" in err and "--allow-cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cpu_smoke_writes_a_table(tmp_path, capsys):
    out = tmp_path / "t.md"
    args = ["bench", "dcn", "--allow-cpu", "--models", "t", "--stages", "4", "--dtypes", "fp32"]
    assert main([*args, "--iters", "1", "--warmup", "0", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| T s4: 1x7x7x512, G=32 | fp32 | reference |" in table and "smoke run" in table


def test_block_cost_counts_projections_and_traffic():
    cost = dcn.block_cost(2, 56, 56, 64, 4, 9, False, 2)
    m = 2 * 56 * 56
    assert cost["fwd_bytes"] == 3 * m * 64 * 2 and cost["fwdbwd_bytes"] == 8 * m * 64 * 2
    assert cost["fwd_flops"] == 2 * m * 64 * (4 * 27) + 2 * m * 64 * 64 + m * 64 * 9 * 8


def test_profile_lists_each_shapes_slowest_kernels_under_the_table(monkeypatch):
    """--profile: the per-kernel GPU times of one fwd+bwd go under the timing table, one row per kernel, names cut
    to fit and free of the table's column bars (the H200 run's report held them)."""
    long_name = (
        "void dcnv3::dcn_bwd_value_kernel<cutlass::bfloat16_t, 16, true, true>(dcnv3::DcnParams)|" + "x" * 40
    )
    monkeypatch.setattr(
        dcn, "PROFILES", [("1024x56x56x64, G=4, bfloat16", "kernel", 327.479, [(long_name, 306.938, 1)])]
    )
    lines = dcn.profile_markdown(dcn.PROFILES)
    rows = [ln for ln in lines if ln.startswith("| 1024x56x56x64")]
    assert len(rows) == 1 and "| 306.938 | 1 |" in rows[0] and "327.479" in rows[0]
    name = rows[0].split("`")[1]
    assert len(name) <= 90 and name.endswith("...") and "|" not in name
    table = dcn._markdown([], {}, torch.device("cpu"), type("Args", (), {})())
    assert "Per-kernel GPU time" in table
