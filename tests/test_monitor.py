"""Monitor: peak table, panels, DCN probe; TensorBoard event files of a real run hold the expected tags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.monitor.panels import DCNProbe, image_grid
from pretrain.monitor.throughput import StepTimer, peak_tflops

REPO = Path(__file__).resolve().parents[1]


def test_peak_table_lookup():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0)
    assert peak_tflops("NVIDIA H200", "bf16") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == pytest.approx(312.0)
    assert peak_tflops("NVIDIA L40S", "bf16") == pytest.approx(362.05)
    assert peak_tflops("NVIDIA L4", "bf16") == pytest.approx(121.0)
    assert peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 on Volta
    assert peak_tflops("Some CPU", "bf16") is None


def test_step_timer_fractions():
    t = StepTimer()
    t.data_begin()
    t.data_end()
    t.step_done(16)
    w = t.window()
    assert 0.0 <= w["data_wait_frac"] <= 1.0 and w["samples_per_s"] > 0


def test_image_grid_shape():
    grid = image_grid(torch.randn(5, 3, 8, 8), pad=2)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 * 10 + 2, 3 * 10 + 2)


def test_dcn_probe_draws_learned_points():
    from pretrain.models import create_model

    model = create_model(
        "internimage_t", channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_classes=10
    )
    probe = DCNProbe(model)
    assert probe.name.startswith("levels.2.")
    x = torch.randn(2, 3, 64, 64)
    probe.arm()
    with torch.no_grad():
        model(x)
    panel = probe.render(x[0])
    assert panel is not None and panel.dtype == torch.uint8 and panel.shape == (3, 256, 256)
    assert probe.render(x[0]) is None  # one panel per arm()
    probe.remove()


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_expected_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb_run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache/torch_extensions"), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"
    )
    sets = [
        "synthetic.enabled=true", "synthetic.image_size=32", "synthetic.batch_size=8", "schedule.total_steps=4",
        "logging.every_steps=1", "logging.dcn_points_every=2", "logging.peak_tflops=1.0", "checkpoint.every_steps=0",
    ]  # fmt: skip
    args = [
        sys.executable,
        "-m",
        "pretrain.cli",
        "train",
        "-c",
        str(REPO / "configs/tiny_cpu.yaml"),
        "--output-dir",
        str(out),
    ]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 4/4 | loss" in proc.stdout and "ETA" in proc.stdout  # the console progress line

    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    expected = {
        "loss/loss", "loss/ce", "loss/top1", "opt/lr", "opt/grad_norm", "opt/loss_scale", "perf/samples_per_s",
        "perf/samples_per_s_per_device", "perf/step_time_s", "perf/data_wait_frac", "perf/tflops_per_device",
        "perf/mfu", "memory/host_max_rss_gib", "train/skipped_steps",
    }  # fmt: skip
    assert expected <= set(tags["scalars"]), expected - set(tags["scalars"])
    assert {"inputs/first_batch", "dcn/sampling_points"} <= set(tags["images"])
    assert [e.step for e in acc.Images("dcn/sampling_points")] == [1, 3]  # armed at steps 0 and 2
    # the scalars read back are the values the run logged
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in acc.Scalars("loss/loss")] == [1, 2, 3, 4]
    for event, row in zip(acc.Scalars("loss/loss"), rows):
        assert event.value == pytest.approx(row["loss/loss"], rel=1e-6)
    # opt/lr is read back from the optimizer's param groups: the schedule really reaches DeepSpeed's AdamW
    # (tiny_cpu: peak 2e-3, 5 warmup steps from 0; the lr of step k is logged at step k + 1)
    assert [e.value for e in acc.Scalars("opt/lr")] == pytest.approx([0.0, 4e-4, 8e-4, 1.2e-3])
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "latest").read_text() == "step_00000004"


def _tb_steps(tb_dir, tag="loss/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _jsonl_steps(path):
    return [(r["step"], r["loss/loss"]) for r in map(json.loads, path.read_text().splitlines())]


def test_resume_purges_replayed_steps_from_metrics_and_tensorboard(tmp_path):
    from pretrain.monitor.writer import Monitor

    first = Monitor(str(tmp_path), enabled=True, console=False)
    first.text("config", "first run", 0)
    for step in range(1, 11):  # the first run got to step 10, its last checkpoint is step 6
        first.scalars(step, {"loss/loss": float(step)})
    first.close()
    second = Monitor(str(tmp_path), enabled=True, console=False)
    assert second.resume(6) == 4
    second.text("config", "resumed", 6)
    for step in range(7, 13):
        second.scalars(step, {"loss/loss": 100.0 + step})
    second.close()
    want = [(s, float(s)) for s in range(1, 7)] + [(s, 100.0 + s) for s in range(7, 13)]
    assert _jsonl_steps(tmp_path / "metrics.jsonl") == want
    assert _tb_steps(tmp_path / "tb") == want


def test_first_scalars_purge_later_records_without_resume_call(tmp_path):
    """A run that restarts without telling the monitor (or a fresh run into an old output folder) still never
    writes a series that goes backwards."""
    from pretrain.monitor.writer import Monitor

    first = Monitor(str(tmp_path), enabled=True, console=False)
    for step in range(1, 9):
        first.scalars(step, {"loss/loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss/lo')  # killed mid-write
    second = Monitor(str(tmp_path), enabled=True, console=False)
    second.image("inputs/first_batch", torch.zeros(3, 4, 4, dtype=torch.uint8), 4)
    for step in range(5, 7):
        second.scalars(step, {"loss/loss": -float(step)})
    second.close()
    want = [(s, float(s)) for s in range(1, 5)] + [(5, -5.0), (6, -6.0)]
    assert _jsonl_steps(tmp_path / "metrics.jsonl") == want
    assert _tb_steps(tmp_path / "tb") == want


@pytest.mark.slow
def test_resumed_run_logs_every_step_once(tmp_path):
    """A real restart from an earlier checkpoint replays steps 3-4: metrics.jsonl and TensorBoard hold each
    step once, the replayed values replacing the first run's."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "pretrain.cli", "train", "-c", str(REPO / "configs/tiny_cpu.yaml")]
    base += ["--output-dir", str(out)]
    for s in ("synthetic.enabled=true", "synthetic.image_size=32", "synthetic.batch_size=8",
              "schedule.total_steps=4", "logging.every_steps=1", "logging.dcn_points_every=0",
              "checkpoint.every_steps=2", "checkpoint.keep=3"):  # fmt: skip
        base += ["--set", s]
    for extra in ([], ["--resume", str(out / "checkpoints" / "step_00000002")]):
        proc = subprocess.run(base + extra, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _jsonl_steps(out / "metrics.jsonl")
    assert [s for s, _ in rows] == [1, 2, 3, 4]
    assert [s for s, _ in _tb_steps(out / "tb")] == [1, 2, 3, 4]
