"""M3I under DeepSpeed bf16: the engine casts the EMA teacher to bf16, so the objective keeps an fp32 master
of it in the rank's trainer state, and a resumed run continues exactly (losses equal step for step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_engine_zero_shot import train_m3i_process

from pretrain.data.sample import make_sample_corpus

pytestmark = pytest.mark.slow


def _train(out: Path, sets: list[str], resume: str | None = None) -> list[dict]:
    train_m3i_process(out, sets, *(["--resume", resume] if resume else []))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss/loss" in r]


def test_bf16_teacher_has_fp32_master_and_resumes_exactly(tmp_path):
    train = make_sample_corpus(str(tmp_path / "corpus"), num=96, num_val=0, size=48)
    sets = [
        f"data.sources=[{{name: sample, uri: {train}, weight: 1.0}}]",
        f"objective.text.tokenizer={tmp_path / 'tokenizer.json'}",
        "objective.zero_shot.every_steps=0",
        "engine.precision=bf16",
        "schedule.total_steps=4",
        "checkpoint.every_steps=2",
        "checkpoint.keep=3",
        "logging.every_steps=1",
        "logging.dcn_points_every=0",
    ]
    full = _train(tmp_path / "full", sets)
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000002"
    state = torch.load(ckpt / "trainer_rank00000.pt", weights_only=False)
    master = state["objective"]["teacher_ema"]["master"]
    assert master is not None and all(m.dtype == torch.float32 for m in master)

    resumed = _train(tmp_path / "resumed", sets, resume=str(ckpt))
    want = {r["step"]: (r["loss/loss"], r["loss/intra"], r["loss/inter"]) for r in full if r["step"] > 2}
    got = {r["step"]: (r["loss/loss"], r["loss/intra"], r["loss/inter"]) for r in resumed}
    assert got == want and sorted(got) == [3, 4]
