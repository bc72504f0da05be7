"""Process-group plumbing: the trainer works under any launcher, or none.

Launchers (`deepspeed`, `torchrun`, Ray Train) set RANK/WORLD_SIZE/MASTER_* and possibly create the process
group themselves; a bare `pretrain train` has none of that, so `ensure_process_group` fills in a world of one
(without it DeepSpeed falls back to MPI discovery and fails on a missing mpi4py).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_env(rank: int, world: int, port: int | str) -> dict[str, str]:
    """The launcher variables of rank `rank` in a single-node world of `world` ranks on 127.0.0.1:`port`."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def set_single_process_env() -> None:
    """RANK=0, WORLD_SIZE=1, ... for a run without a launcher (values already set are kept)."""
    for key, value in local_world_env(0, 1, _free_port()).items():
        os.environ.setdefault(key, value)


def backend_for(choice: str = "auto") -> str:
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


def ensure_process_group(backend: str = "auto") -> None:
    """Join the launcher's process group, or create a world of one. Idempotent."""
    if not (dist.is_available() and dist.is_initialized()):
        if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
            set_single_process_env()
        os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    import deepspeed

    # DeepSpeed's comm layer wraps an existing torch process group (Ray Train creates one) or makes its own.
    deepspeed.init_distributed(dist_backend=backend_for(backend), auto_mpi_discovery=False)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise max over ranks: one small collective for several flags at once."""
    t = torch.tensor(values, dtype=torch.float64, device=device() if backend_is_nccl() else "cpu")
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device() if backend_is_nccl() else "cpu")
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world_size()
    return t.tolist()


def backend_is_nccl() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"
