"""Checkpoints: one directory per step, a `latest` pointer, the last K kept.

Layout under the checkpoint root (a local path or any fsspec URL):

    latest                          text file: the name of the newest *complete* step directory
    step_00001000/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   DeepSpeed's own files
        trainer_rank00000.pt        our state of rank 0: step, data cursor, RNG states, EMA shard, counters
        trainer_rank00001.pt        ... one per rank (cursors and RNG streams differ per rank)
        config.yaml                 the resolved run config
        meta.json                   step, world size, ZeRO stage, optimizer class, wall time

`latest` is switched (write-then-rename) by rank 0 only after a barrier that every rank reaches once its
files are written, so a crash mid-save leaves the previous checkpoint as `latest`. Remote roots are written
through a local staging directory that each node's local rank 0 uploads (then the barrier, then `latest`).

Resharding: a checkpoint loads only on the world size that wrote it, unless it is a DeepSpeed *universal*
checkpoint (`pretrain convert CKPT OUT --to universal`: `<tag>/zero/<param>/fp32.pt`... plus `latest` and
`latest_universal`), which any world size resumes (the trainer sets DeepSpeed's `checkpoint.load_universal`).
The data cursor is global, so a rank without its own `trainer_rank*.pt` takes rank 0's: the resharded run sees
exactly the samples the original would have, but its RNG streams (drop-path, augmentation order) come from
rank 0's file, so it is sample-exact, not bit-identical, to an unresharded resume. A ZeRO-3 EMA is kept per
rank on that rank's parameter slices and cannot be re-split: such a checkpoint resumes on its own world size.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..data import storage
from ..fields import ConfigError
from . import dist

_STEP_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str | None) -> int:
    """The step of a `step_XXXXXXXX` tag; -1 for anything else."""
    m = _STEP_RE.match(tag or "")
    return int(m.group(1)) if m else -1


def _is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def _local_path(root: str) -> str:
    return root[len("file://") :] if root.startswith("file://") else root


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Save/load/prune step directories under `root`. Every method is collective (call it on all ranks)."""

    def __init__(self, root: str, keep: int = 3):
        self.root = root
        self.keep = keep
        self.remote = _is_remote(root)
        if self.remote:
            self.fs, self.fs_root = storage.url_to_fs(root)
            self.stage = (
                Path(tempfile.gettempdir()) / f"pretrain_ckpt_stage_{os.getuid()}" / re.sub(r"\W", "_", root)
            )
        else:
            self.fs, self.fs_root = None, _local_path(root)
            self.stage = Path(self.fs_root)

    # ------------------------------------------------------------------------------------------ pointers
    def latest(self) -> str | None:
        """The tag `latest` points to, or None when there is no complete checkpoint."""
        text = self._read_text(LATEST)
        return text.strip() if text else None

    def tags(self) -> list[str]:
        if self.remote:
            names = (
                [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.fs_root, detail=False)]
                if self.fs.exists(self.fs_root)
                else []
            )
        else:
            root = Path(self.fs_root)
            names = [p.name for p in root.iterdir() if p.is_dir()] if root.exists() else []
        return sorted((n for n in names if _STEP_RE.match(n)), key=lambda n: int(_STEP_RE.match(n).group(1)))

    def is_universal(self, tag: str) -> bool:
        """Whether step `tag` is a DeepSpeed universal checkpoint: `<tag>/zero/` exists or `latest_universal` names it."""
        if (self._read_text(LATEST_UNIVERSAL) or "").strip() == tag:
            return True
        if self.remote:
            return self.fs.isdir(f"{self.fs_root}/{tag}/zero")
        return (Path(self.fs_root) / tag / "zero").is_dir()

    def meta(self, tag: str) -> dict:
        """`<tag>/meta.json` (step, world_size, zero_stage, optimizer, time); {} when absent. The one reader
        of checkpoint metadata (the trainer's resume and the Ray job's preflight both use it)."""
        text = self._read_text(f"{tag}/meta.json")
        return json.loads(text) if text else {}

    def _read_text(self, name: str) -> str | None:
        if self.remote:
            path = f"{self.fs_root}/{name}"
            return self.fs.cat_file(path).decode() if self.fs.exists(path) else None
        path = Path(self.fs_root) / name
        return path.read_text() if path.exists() else None

    def _write_latest(self, tag: str) -> None:
        if self.remote:  # an object PUT replaces atomically
            self.fs.pipe_file(f"{self.fs_root}/{LATEST}", tag.encode())
            return
        root = Path(self.fs_root)
        tmp = root / f".{LATEST}.tmp.{os.getpid()}"
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)

    # ------------------------------------------------------------------------------------------ save
    def save(self, engine, step: int, trainer_state: dict, config_yaml: str) -> str:
        """DeepSpeed's shards + this rank's `trainer_state`; returns the step directory's URL."""
        tag = tag_for(step)
        rank = dist.rank()
        local_dir = self.stage / tag
        if rank == 0:
            local_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        engine.save_checkpoint(str(self.stage), tag=tag, client_state={"step": step}, save_latest=False)
        local_dir.mkdir(parents=True, exist_ok=True)  # other nodes' staging dirs
        torch.save(trainer_state, local_dir / f"trainer_rank{rank:05d}.pt")
        if rank == 0:
            (local_dir / "config.yaml").write_text(config_yaml)
            meta = {
                "step": step,
                "world_size": dist.world_size(),
                "time": time.time(),
                "zero_stage": engine.zero_optimization_stage(),
                # the optimizer that really ran, e.g. DeepSpeedCPUAdam under optimizer offload
                "optimizer": type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__,
            }
            (local_dir / "meta.json").write_text(json.dumps(meta, indent=1))
        dist.barrier()
        if self.remote and dist.local_rank() == 0:
            self.fs.put(str(local_dir), f"{self.fs_root}/{tag}", recursive=True)
        dist.barrier()
        if self.remote and dist.local_rank() == 0:
            shutil.rmtree(local_dir, ignore_errors=True)
        if rank == 0:
            self._write_latest(tag)
            self.prune(tag)
        dist.barrier()
        return f"{self.root.rstrip('/')}/{tag}"

    def prune(self, latest: str) -> None:
        """Delete all but the newest `keep` step directories (never `latest`). Rank 0 only."""
        if self.keep <= 0:
            return
        tags = self.tags()
        newest = int(_STEP_RE.match(latest).group(1))
        old = [t for t in tags if int(_STEP_RE.match(t).group(1)) <= newest][: -self.keep]
        for tag in old:
            if tag == latest:
                continue
            if self.remote:
                self.fs.rm(f"{self.fs_root}/{tag}", recursive=True)
            else:
                shutil.rmtree(Path(self.fs_root) / tag, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ load
    def load(self, engine, tag: str) -> dict:
        """Restore DeepSpeed's state and return this rank's trainer state."""
        rank = dist.rank()
        if self.remote:
            if dist.local_rank() == 0:
                shutil.rmtree(self.stage / tag, ignore_errors=True)
                self.stage.mkdir(parents=True, exist_ok=True)
                self.fs.get(f"{self.fs_root}/{tag}", str(self.stage / tag), recursive=True)
            dist.barrier()
        step_dir = self.stage / tag
        meta = self.meta(tag)
        world = dist.world_size()
        saved_world = meta.get("world_size", world)
        universal = self.is_universal(tag)
        if saved_world != world and not universal:
            raise ConfigError(
                f"checkpoint {self.root}/{tag} was written by {saved_world} ranks, this run has {world}: its "
                "ZeRO shards cannot be re-split. Resume with the same world size, or convert it to a universal "
                f"checkpoint (pretrain convert {self.root}/{tag} OUT --to universal) and --resume OUT."
            )
        if universal and not engine.load_universal_checkpoint():
            raise RuntimeError(
                f"checkpoint {self.root}/{tag} is a universal checkpoint: the DeepSpeed config needs "
                '"checkpoint": {"load_universal": true} (the trainer sets it when it resolves --resume)'
            )
        own = step_dir / f"trainer_rank{rank:05d}.pt"
        # the data cursor is global (identical on every rank), so rank 0's serves a rank the old run lacked
        state = torch.load(
            own if own.exists() or not universal else step_dir / "trainer_rank00000.pt",
            map_location="cpu",
            weights_only=False,
        )
        zero3 = 3 in (meta.get("zero_stage"), engine.zero_optimization_stage())
        if saved_world != world and zero3 and state.get("ema") is not None:
            raise RuntimeError(
                f"checkpoint {self.root}/{tag} holds a weight EMA and was written by {saved_world} ranks, this "
                f"run has {world}: under ZeRO-3 each rank keeps the EMA of its own parameter slices, which "
                "cannot be re-split. Resume on the same world size (or with ema.enabled=false)."
            )
        try:
            load_path, _ = engine.load_checkpoint(
                str(self.stage), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except RuntimeError as err:  # torch's size-mismatch report: ~100 lines that never name the checkpoint
            if (
                "size mismatch" not in str(err)
                and "Missing key" not in str(err)
                and "Unexpected key" not in str(err)
            ):
                raise
            raise ConfigError(
                f"checkpoint {self.root}/{tag} holds another model (its state dict does not fit: "
                f"{str(err).splitlines()[0].strip()} ...): resume with the model settings it was saved with"
            ) from None
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root}/{tag}")
        if universal:  # DeepSpeed 0.19's universal load leaves buffers (BatchNorm statistics) at init
            from pretrain.convert import restore_buffers

            restore_buffers(engine.module, self.stage, tag)
        dist.barrier()
        if self.remote and dist.local_rank() == 0:
            shutil.rmtree(self.stage / tag, ignore_errors=True)
        return state


def resolve_resume(resume: str | None, default_root: str) -> tuple[str, str] | None:
    """`--resume auto|PATH` -> (checkpoint root, tag), or None to start fresh.

    auto: the `latest` of the run's own checkpoint root (fresh start when there is none). PATH: a step
    directory (`.../step_00001000`) or a checkpoint root with a `latest` (or `latest_universal`) file.
    """
    if not resume:
        return None
    if resume == "auto":
        tag = CheckpointManager(default_root).latest()
        return (default_root, tag) if tag else None
    path = resume.rstrip("/")
    name = path.rsplit("/", 1)[-1]
    if _STEP_RE.match(name):
        return path[: -len(name) - 1] or ".", name
    manager = CheckpointManager(path)
    tag = manager.latest() or (manager._read_text(LATEST_UNIVERSAL) or "").strip() or None
    if tag is None:
        raise FileNotFoundError(
            f"--resume {resume}: neither a step_* directory nor a root with a '{LATEST}' file"
        )
    return path, tag
