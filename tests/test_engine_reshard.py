"""Resharding: a 2-rank checkpoint, converted to DeepSpeed's universal format, resumes on 1 rank.

The run reads a generated sample corpus through pretrain.data, whose cursor is global: with the same global
batch (2 ranks x 8 on one side, 1 rank x 8 x grad_accum 2 on the other) a global step holds the same samples
in the same micro-batches whatever the world size, so the resumed losses continue the 2-rank run's (only the
gradient reduction order differs). Launch helpers come from tests/test_engine_distributed.py.
"""

from __future__ import annotations

import json

import pytest
from test_engine_distributed import ENV, TIMEOUT, assert_checkpoint, losses, run2, tiny_args

from pretrain.engine.local_launch import run_local

pytestmark = pytest.mark.slow

STEPS, STOP = 6, 3  # 96 samples at a global batch of 16: one epoch


def run1(args: list[str]):
    (result,) = run_local(1, args, env=ENV, timeout=TIMEOUT)
    return result


def test_universal_checkpoint_resumes_on_another_world_size(tmp_path):
    from pretrain.convert import convert
    from pretrain.data import make_sample_corpus

    manifest = make_sample_corpus(str(tmp_path / "corpus"), num=96, size=32, shard_rows=48, row_group_rows=16)
    common = [
        "--set", "synthetic.enabled=false",
        "--set", f"data.sources=[{{name: sample, uri: '{manifest}', weight: 1.0}}]",
        "--set", "data.image_size=32", "--set", "data.batch_size=8", "--set", "data.num_workers=1",
        "--set", f"checkpoint.every_steps={STOP}",
    ]  # fmt: skip
    two = tmp_path / "two"
    run2(tiny_args(two, STEPS, *common))
    step_dir = assert_checkpoint(two, STEPS).parent / f"step_{STOP:08d}"
    assert json.loads((step_dir / "meta.json").read_text())["world_size"] == 2

    # a plain (non-universal) 2-rank checkpoint refuses a 1-rank resume, and names the fix
    refused = run1(tiny_args(tmp_path / "refused", STEPS, *common, "--resume", str(step_dir)))
    assert refused.returncode != 0
    assert "written by 2 ranks, this run has 1" in refused.output and "--to universal" in refused.output

    universal = tmp_path / "universal"
    convert(step_dir, universal, to="universal")
    assert (universal / "latest_universal").read_text().strip() == step_dir.name

    one = tmp_path / "one"
    r = run1(tiny_args(one, STEPS, *common, "--set", "engine.grad_accum=2", "--resume", str(universal)))
    assert r.returncode == 0, r.output[-4000:]
    assert f"starting at step {STOP}" in r.output
    assert_checkpoint(one, STEPS, world=1)

    reference, resumed = dict(losses(two)), losses(one)
    assert [s for s, _ in resumed] == list(range(STOP + 1, STEPS + 1))
    for step, loss in resumed:
        assert loss == pytest.approx(reference[step], rel=1e-4, abs=1e-5), (step, resumed, reference)
