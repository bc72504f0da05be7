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
