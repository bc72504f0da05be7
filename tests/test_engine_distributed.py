"""Two CPU ranks on gloo, real DeepSpeed: ZeRO-1/2/3 train, a stopped + resumed run reproduces the losses.

Each test starts `pretrain train` as two processes (the launcher environment set by
`pretrain.engine.local_launch`, or the real `deepspeed` launcher through launch/deepspeed_train.sh) on a tiny
InternImage fed by the synthetic stream. DeepSpeed's shared-memory comm op is JIT-built once into
`.cache/torch_extensions` (~45 s the first time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pretrain.engine.local_launch import run_local

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENV = {
    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning",
}
TIMEOUT = 300


def tiny_args(out: Path, steps: int = 8, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
        "--output-dir", str(out),
        "--set", "synthetic.enabled=true",
        "--set", "synthetic.image_size=32",
        "--set", "synthetic.batch_size=8",
        "--set", f"schedule.total_steps={steps}",
        "--set", "schedule.warmup_steps=0",
        "--set", "logging.every_steps=1",
        "--set", "logging.dcn_points_every=4",
        "--set", "checkpoint.every_steps=4",
        *extra,
    ]  # fmt: skip


def run2(args: list[str]) -> None:
    results = run_local(2, args, env=ENV, timeout=TIMEOUT)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.output[-4000:]}"


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/loss"]) for r in rows]


def assert_loss_goes_down(out: Path, steps: int) -> None:
    ls = losses(out)
    assert [s for s, _ in ls] == list(range(1, steps + 1))
    first, last = ls[0][1], ls[-1][1]
    assert last < 0.85 * first, f"loss did not go down: {ls}"


def assert_checkpoint(out: Path, step: int, world: int = 2) -> Path:
    root = out / "checkpoints"
    tag = (root / "latest").read_text().strip()
    assert tag == f"step_{step:08d}"
    step_dir = root / tag
    for rank in range(world):
        assert (step_dir / f"trainer_rank{rank:05d}.pt").exists()
    assert (step_dir / "config.yaml").exists() and (step_dir / "meta.json").exists()
    return step_dir


def test_zero1_grad_accum_deepspeed_launcher(tmp_path):
    """ZeRO-1 with gradient accumulation, started by launch/deepspeed_train.sh (the real launcher)."""
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    out = tmp_path / "z1"
    env = {**os.environ, **ENV, "NUM_GPUS": "2", "MASTER_PORT": str(_port())}
    args = tiny_args(out, 8, "--set", "engine.zero_stage=1", "--set", "engine.grad_accum=2")
    proc = subprocess.run(
        [str(REPO / "launch" / "deepspeed_train.sh"), *args], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "world 2 | ZeRO-1" in proc.stdout + proc.stderr
    assert_loss_goes_down(out, 8)
    step_dir = assert_checkpoint(out, 8)
    assert json.loads((step_dir / "meta.json").read_text())["zero_stage"] == 1
    # keep: 2 in tiny_cpu.yaml -> steps 4 and 8 remain
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]


def test_zero2_bf16(tmp_path):
    out = tmp_path / "z2"
    run2(tiny_args(out, 8, "--set", "engine.zero_stage=2", "--set", "engine.precision=bf16"))
    assert_loss_goes_down(out, 8)
    assert_checkpoint(out, 8)


def test_zero3_partitioned_with_ema(tmp_path):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0) and the weight EMA on its shards."""
    out = tmp_path / "z3"
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    run2(tiny_args(out, 8, "--set", "engine.zero_stage=3", "--set", f"engine.deepspeed_config={raw}",
                   "--set", "ema.enabled=true", "--set", "ema.decay=0.9"))  # fmt: skip
    assert_loss_goes_down(out, 8)
    step_dir = assert_checkpoint(out, 8)
    import torch

    # each rank's EMA holds only its own slices: together they cover every trainable parameter once
    states = [torch.load(step_dir / f"trainer_rank{r:05d}.pt", weights_only=False) for r in range(2)]
    shard_numel = [sum(t.numel() for t in s["ema"]["shadow"]) for s in states]
    assert shard_numel[0] > 0 and abs(shard_numel[0] - shard_numel[1]) <= 2 * len(states[0]["ema"]["shadow"])
    assert any(p.name.startswith("zero_pp_rank_1") for p in step_dir.iterdir())


@pytest.mark.parametrize(
    "data, stage, offload",
    [("corpus", 1, False), ("synthetic", 3, False), ("synthetic", 2, True)],
    ids=["zero1-corpus", "zero3-synthetic", "zero2-cpu-offload"],
)
def test_resume_reproduces_losses(tmp_path, data, stage, offload):
    """Uninterrupted 8 steps == 4 steps, stop, `--resume auto`, 4 more: identical losses and grad norms.

    Drop-path is on, so the resumed run also needs the RNG states back; DeepSpeed's optimizer state (ZeRO
    shards) and each rank's data cursor must round-trip exactly too. The corpus case reads a generated sample
    corpus of 96 images through pretrain.data (6 steps per epoch at 2 x 8): the runs cross an epoch boundary
    after the resume point. The offload case keeps the optimizer on the CPU (DeepSpeed's CPUAdam, JIT-built on
    first use) and checks that it was really used.
    """
    common = ["--set", f"engine.zero_stage={stage}", "--set", "model.drop_path_rate=0.2"]
    if offload:
        common += ["--set", "engine.offload_optimizer=true"]
    if data == "corpus":
        from pretrain.data import make_sample_corpus

        manifest = make_sample_corpus(
            str(tmp_path / "corpus"), num=96, size=32, shard_rows=48, row_group_rows=16
        )
        common += [
            "--set", "synthetic.enabled=false",
            "--set", f"data.sources=[{{name: sample, uri: '{manifest}', weight: 1.0}}]",
            "--set", "data.image_size=32", "--set", "data.batch_size=8", "--set", "data.num_workers=1",
        ]  # fmt: skip
    full, split = tmp_path / "full", tmp_path / "split"
    run2(tiny_args(full, 8, *common))
    run2(tiny_args(split, 8, *common, "--set", "schedule.stop_at_step=4"))
    assert_checkpoint(split, 4)
    run2(tiny_args(split, 8, *common, "--resume", "auto"))
    assert_checkpoint(split, 8)

    def rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(full), rows(split)
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("loss/loss", "opt/grad_norm", "opt/lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    if data == "corpus":  # the stream's counters reach TensorBoard: 8 steps x 2 ranks x 8 samples
        assert a[-1]["data/samples"] == 128
    if offload:
        meta = json.loads((split / "checkpoints" / "step_00000008" / "meta.json").read_text())
        assert meta.get("optimizer") == "DeepSpeedCPUAdam", meta


def _port() -> int:
    from pretrain.engine.dist import _free_port

    return _free_port()
