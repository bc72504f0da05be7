"""Zero-shot evaluation runs inside training: every `objective.zero_shot.every_steps` steps the trainer
evaluates the held-out split on its device and dtype, logs `zeroshot/*` to TensorBoard/metrics.jsonl and
prints them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.data.sample import make_sample_corpus

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def train_m3i_process(out: Path, sets: list[str], *extra: str) -> subprocess.CompletedProcess:
    """`pretrain train` of configs/tiny_cpu_m3i.yaml in a fresh single process (no launcher variables), with
    `--set` overrides and extra arguments; asserts it succeeded."""
    args = [sys.executable, "-m", "pretrain.cli", "train", "-c", str(REPO / "configs/tiny_cpu_m3i.yaml")]
    args += ["--output-dir", str(out)]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([*args, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_trainer_logs_zero_shot_metrics(tmp_path):
    train = make_sample_corpus(str(tmp_path / "corpus"), num=64, num_val=32, size=48)
    val = str(tmp_path / "corpus" / "val" / "manifest.json")
    out = tmp_path / "run"
    sets = [
        f"data.sources=[{{name: sample, uri: {train}, weight: 1.0}}]",
        f"objective.zero_shot.split={val}",
        f"objective.text.tokenizer={tmp_path / 'tokenizer.json'}",
        "objective.zero_shot.every_steps=2",
        "schedule.total_steps=2",
        "logging.every_steps=1",
        "logging.dcn_points_every=0",
        "checkpoint.every_steps=0",
    ]
    proc = train_m3i_process(out, sets)
    assert "zeroshot/top1" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "zeroshot/top1" in r]
    assert evals and evals[-1]["step"] == 2
    assert (
        evals[-1]["zeroshot/n"] == 32
        and 0.0 <= evals[-1]["zeroshot/top1"] <= evals[-1]["zeroshot/top5"] <= 1.0
    )
