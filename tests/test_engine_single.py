"""One process without a launcher: SIGTERM saves and `--resume auto` continues; NaN losses are skipped, counted,
and K in a row stop the run after saving; a launcher-provided stream (`stream_factory`) is used as is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    e.update(
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore::FutureWarning",
    )
    return e


TINY = [
    "synthetic.enabled=true",
    "synthetic.image_size=32",
    "synthetic.batch_size=8",
    "logging.every_steps=1",
    "logging.dcn_points_every=0",
]


def cli(out: Path, *sets: str, resume: str | None = None) -> list[str]:
    args = [sys.executable, "-m", "pretrain.cli", "train", "-c", str(REPO / "configs/tiny_cpu.yaml")]
    args += ["--output-dir", str(out)]
    for s in (*TINY, *sets):
        args += ["--set", s]
    if resume:
        args += ["--resume", resume]
    return args


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_sigterm_saves_then_resume_auto_continues(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli(out, "schedule.total_steps=100000", "checkpoint.every_steps=0"),
        env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(steps_logged(out)) < 2:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training steps within 240 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "signal SIGTERM" in output
    step = steps_logged(out)[-1]
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step:08d}"

    done = subprocess.run(
        cli(out, "schedule.total_steps=100000", "checkpoint.every_steps=0", f"schedule.stop_at_step={step + 2}",
            resume="auto"),
        env=env(), cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'}/step_{step:08d} at step {step}" in done.stdout
    assert steps_logged(out)[-3:] == [step, step + 1, step + 2]
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step + 2:08d}"


SCRIPT = """
from pretrain.config import load_config
from pretrain.data.synthetic import SyntheticStream
from pretrain.engine.trainer import NonFiniteLossError, Trainer


class Poisoned(SyntheticStream):
    # batch 3 has NaN pixels (one skip, then training recovers); from batch 6 on every batch does
    def __next__(self):
        batch = super().__next__()
        if self.index == 3 or self.index >= 6:
            batch["image"][:] = float("nan")
        return batch


cfg = load_config("configs/tiny_cpu.yaml", {sets!r})
try:
    Trainer(cfg, stream_factory=lambda c, rank, world: Poisoned(8, 32, 6, seed=c.seed, rank=rank)).fit()
except NonFiniteLossError as err:
    print("STOPPED:", err)
"""


def test_nonfinite_losses_are_skipped_counted_and_stop_after_saving(tmp_path):
    out = tmp_path / "nan"
    sets = [*TINY, f"output_dir={out}", "engine.max_nonfinite=3", "schedule.total_steps=50"]
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT.format(sets=sets))],
        env=env(), cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "STOPPED: 3 consecutive micro-steps had a NaN/inf loss at step 4" in proc.stdout
    # batches 1, 2 -> steps 1, 2; batch 3 skipped; 4, 5 -> steps 3, 4; 6, 7, 8 skipped -> stop
    assert steps_logged(out) == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    state = torch.load(out / "checkpoints" / "step_00000004" / "trainer_rank00000.pt", weights_only=False)
    assert state["skipped"] == 4 and state["consecutive_nonfinite"] == 3
    assert state["stream"] == {"index": 8}


REMOTE = """
import json, fsspec
from pretrain.config import load_config
from pretrain.engine import dist
from pretrain.engine.trainer import Trainer

dist.ensure_process_group()  # one group for both trainers of this process
sets = {sets!r}
first = Trainer(load_config("configs/tiny_cpu.yaml", sets + ["schedule.stop_at_step=2"])).fit()
fs = fsspec.filesystem("memory")
print("LATEST", fs.cat_file("/ckpt/latest").decode())
print("FILES", sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/ckpt/step_00000002", detail=False)))
second = Trainer(load_config("configs/tiny_cpu.yaml", sets), resume="auto").fit()
print("RESUMED", json.dumps([r["step"] for r in second["history"]]), second["checkpoint"])
print("LATEST", fs.cat_file("/ckpt/latest").decode())
"""


def test_checkpoints_on_an_fsspec_url(tmp_path):
    """checkpoint.dir may be any fsspec URL: shards are staged locally, uploaded, then `latest` is written."""
    sets = [*TINY, f"output_dir={tmp_path / 'out'}", "checkpoint.dir=memory://ckpt", "schedule.total_steps=4"]
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REMOTE.format(sets=sets))],
        env=env(), cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("LATEST", "FILES", "RESUMED"))]
    assert lines[0] == "LATEST step_00000002"
    assert "trainer_rank00000.pt" in lines[1] and "mp_rank_00_model_states.pt" in lines[1]
    assert lines[2] == "RESUMED [3, 4] memory://ckpt/step_00000004"
    assert lines[3] == "LATEST step_00000004"
