"""A stop requested on one rank stops every rank at the same step, which is saved (issue 14, item 1).

`ray job stop` reaches each rank's stop watcher at a different moment. Before the fix, a rank whose flag was set
after the step's last all-reduce left the loop alone and waited in the checkpoint barrier while the other rank
waited in the next step's all-reduce: a deadlock. Here rank 1 alone requests the stop at exactly that moment
(from the stream's `counters()`, which the trainer reads while logging, after the step's last all-reduce).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pretrain.engine.dist import _free_port, local_world_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pretrain.config import load_config
    from pretrain.data.synthetic import SyntheticStream
    from pretrain.engine.trainer import Trainer

    holder = {}

    class StopOnRank1(SyntheticStream):
        def counters(self):
            trainer = holder["trainer"]
            if self.rank == 1 and trainer.step == 3:
                trainer.request_stop()  # after this step's last all-reduce, on this rank only
            return {}

    def factory(cfg, rank, world):
        return StopOnRank1(4, 32, 6, seed=cfg.seed, rank=rank)

    cfg = load_config("configs/tiny_cpu.yaml", sys.argv[1:])
    trainer = holder["trainer"] = Trainer(cfg, stream_factory=factory)
    summary = trainer.fit()
    print("SUMMARY " + json.dumps({k: summary[k] for k in ("step", "reason", "checkpoint")}), flush=True)
    """
)


def test_stop_on_one_rank_after_the_all_reduce_stops_all_ranks_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    sets = [
        f"output_dir={out}",
        "schedule.total_steps=8",
        "logging.every_steps=1",
        "logging.dcn_points_every=0",
        "logging.image_grid=false",
        "logging.tensorboard=false",
        "checkpoint.every_steps=0",
        "engine.precision=fp32",
        "model.num_classes=6",
    ]
    port = _free_port()
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, *sets],
            env={**env, **local_world_env(rank, 2, port)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:  # the old deadlock: never returns
                p.kill()
                p.wait()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    summaries = [
        json.loads(line.split(" ", 1)[1])
        for text in outputs
        for line in text.splitlines()
        if line.startswith("SUMMARY ")
    ]
    assert len(summaries) == 2
    assert {s["step"] for s in summaries} == {4}  # the flag is seen at step 4's all-reduce, on both ranks
    assert {s["reason"] for s in summaries} == {"signal SIGTERM"}
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    for rank in range(2):
        assert (out / "checkpoints" / "step_00000004" / f"trainer_rank{rank:05d}.pt").exists()
