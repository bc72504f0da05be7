"""Real 2-rank DeepSpeed ZeRO-1/2/3 checkpoints (gloo, CPU) consolidate to the weights the engine held;
a ZeRO checkpoint resharded through the universal format resumes on 1 rank with the loss continuing."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pretrain.convert import ConvertError, convert, load_pretrained, restore_buffers
from pretrain.engine.dist import local_world_env
from pretrain.models import create_model
from pretrain.objectives.base import Objective

pytestmark = pytest.mark.slow

TINY = dict(channels=8, depths=[1, 1, 2, 1], groups=[1, 2, 2, 4], drop_path_rate=0.0)
GLOBAL_BATCH = 4
IMAGE = 32


class TinyObjective(Objective):
    """Backbone + an extra head + a frozen EMA-like teacher, as our objectives wrap the backbone."""

    def __init__(self):
        super().__init__()
        self.backbone = create_model("internimage_t", num_classes=6, **TINY)
        self.proj = torch.nn.Linear(6, 6)
        self.teacher = create_model("internimage_t", num_classes=6, **TINY)
        self.teacher.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():  # running statistics: the loss must not depend on how the batch is split
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, batch):
        logits = self.proj(self.backbone(batch["image"]))
        return {"loss": torch.nn.functional.cross_entropy(logits, batch["label"])}

    def frozen_module_names(self):
        return ("teacher",)


def _batch(step: int, rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(GLOBAL_BATCH, 3, IMAGE, IMAGE, generator=g)
    labels = torch.randint(0, 6, (GLOBAL_BATCH,), generator=g)
    per = GLOBAL_BATCH // world
    return {"image": images[rank * per : (rank + 1) * per], "label": labels[rank * per : (rank + 1) * per]}


def _ds_config(stage: int, world: int, universal: bool = False) -> dict:
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.05, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def _global_loss(loss: torch.Tensor, world: int) -> float:
    loss = loss.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(loss)
    return loss.item() / world


def _worker(rank: int, world: int, port: int, job: dict) -> None:
    # the shared-memory comm op is JIT-built once into the repo's cache (as the engine tests do)
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions")
    )
    os.environ.update(local_world_env(rank, world, port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in job["stages"]:
        torch.manual_seed(0)
        model = TinyObjective().train()
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=_ds_config(stage, world, universal=bool(job.get("resume"))),
        )
        start = 0
        if job.get("resume"):
            resume = job["resume"].format(stage=stage)
            engine.load_checkpoint(resume)
            restore_buffers(engine.module, resume)
            start = engine.global_steps
            held = torch.load(job["held"].format(stage=stage), weights_only=True)
            for key, value in engine.module.state_dict().items():  # resumed weights == the 2-rank run's
                assert torch.equal(value, held[key]), key
        losses = []
        for step in range(start, job["steps"]):
            out = engine(_batch(step, rank, world))
            engine.backward(out["loss"])
            engine.step()
            losses.append(_global_loss(out["loss"], world))
            if step + 1 == job.get("save_at"):
                engine.save_checkpoint(os.path.join(job["out"], f"zero{stage}"))
                if stage == 3:
                    params = list(engine.module.parameters())
                    with deepspeed.zero.GatheredParameters(params):
                        held = {k: v.clone() for k, v in engine.module.state_dict().items()}
                else:
                    held = {k: v.clone() for k, v in engine.module.state_dict().items()}
                if rank == 0:
                    torch.save(held, os.path.join(job["out"], f"held{stage}.pt"))
        if rank == 0:
            with open(os.path.join(job["out"], f"losses{stage}_{world}.json"), "w") as f:
                json.dump({"start": start, "losses": losses}, f)
        torch.distributed.barrier()
        del engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, job: dict) -> None:
    mp.start_processes(
        _worker, args=(world, _free_port(), job), nprocs=world, start_method="spawn", join=True
    )


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """Train 2 ranks for 3 steps under ZeRO-1, -2 and -3, checkpoint after step 2, keep the held weights."""
    out = tmp_path_factory.mktemp("zero")
    _run(2, {"stages": [1, 2, 3], "steps": 4, "save_at": 2, "out": str(out)})
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_checkpoint_consolidates_to_held_weights(zero_run, stage, tmp_path):
    held = torch.load(zero_run / f"held{stage}.pt", weights_only=True)
    ckpt = zero_run / f"zero{stage}"

    full = tmp_path / "full.pt"
    report = convert(ckpt, full, to="consolidated")
    assert report.info["zero_stage"] == stage and report.info["world_size"] == 2
    if stage < 3:  # our per-parameter gather, not DeepSpeed's whole-group concatenation
        assert report.info["gather"].startswith("per parameter")
    got = torch.load(full, weights_only=True)
    assert list(got) == list(held)  # every tensor, in the module's order
    for key, value in held.items():
        assert torch.equal(got[key], value), key

    # the backbone, found under `backbone.` (not the teacher's copy), into the official format
    official = tmp_path / "official.pth"
    report = convert(ckpt / "global_step2", official, model="internimage_t", model_kwargs=TINY)
    assert report.prefix == "backbone."
    weights = torch.load(official, weights_only=True)["model"]
    backbone = {k[len("backbone.") :]: v for k, v in held.items() if k.startswith("backbone.")}
    assert set(weights) == set(backbone)
    for key, value in backbone.items():
        assert torch.equal(weights[key], value), key

    # and straight into a model for init_from
    model = create_model("internimage_t", num_classes=6, **TINY)
    load_pretrained(ckpt, model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, backbone[key]), key


def test_missing_rank_shard_is_refused(zero_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(zero_run / "zero2", broken)
    for f in (broken / "global_step2").glob("*rank_1*optim_states.pt"):
        f.unlink()
    dst = tmp_path / "out.pth"
    with pytest.raises(ConvertError, match="missing|incomplete"):
        convert(broken, dst, model="internimage_t", model_kwargs=TINY)
    assert not dst.exists() and not list(tmp_path.glob(".out.pth*"))


def test_reshard_two_ranks_to_one_resumes(zero_run, tmp_path):
    """ZeRO-1/2/3 checkpoints of 2 ranks -> universal -> resumed by 1 rank (one process for all three)."""
    stages = [1, 2, 3]
    for stage in stages:
        report = convert(zero_run / f"zero{stage}", tmp_path / f"universal{stage}", to="universal")
        assert report.info["world_size"] == 2 and report.info["zero_stage"] == stage
        assert (tmp_path / f"universal{stage}" / "latest_universal").read_text() == "global_step2"
        # a universal checkpoint is itself a source: it consolidates to the same weights
        convert(tmp_path / f"universal{stage}", tmp_path / f"u{stage}.pt", to="consolidated")
        got, held = (
            torch.load(p, weights_only=True)
            for p in (tmp_path / f"u{stage}.pt", zero_run / f"held{stage}.pt")
        )
        assert list(got) == list(held) and all(torch.equal(got[k], held[k]) for k in held)

    job = {
        "stages": stages,
        "steps": 4,
        "resume": str(tmp_path / "universal{stage}"),
        "out": str(tmp_path),
        "held": str(zero_run / "held{stage}.pt"),
    }
    _run(1, job)  # asserts in the worker: the resumed weights equal the ones the 2-rank engine held
    for stage in stages:
        reference = json.loads((zero_run / f"losses{stage}_2.json").read_text())["losses"]
        resumed = json.loads((tmp_path / f"losses{stage}_1.json").read_text())
        assert resumed["start"] == 2
        # steps 3 and 4 on one rank continue the 2-rank run (same global batch; only reduction order differs)
        assert resumed["losses"] == pytest.approx(reference[2:], rel=1e-5, abs=1e-6), stage
