"""ZeRO-aware parameter helpers below both the engine and the objectives: local shards and weight EMAs.

The engine keeps a `WeightEMA` of the trained weights; objectives keep EMA teachers (`TeacherEMA`). Both need
to know how DeepSpeed lays a parameter out, and neither may import the other, so the helpers live here.

Under ZeRO-3 a module's parameters are partitioned: between forward passes `p.data` is an empty placeholder and
each rank holds `p.ds_tensor`, its 1/world slice of the flattened parameter. That holds for *every* parameter
of the engine's module, frozen ones included, so an EMA teacher that lives inside the Objective is partitioned
too. Two parameters of the same shape are partitioned at the same offsets, so an EMA update is correct when it
runs on the local slices: `local_shard(teacher_p).lerp_(local_shard(student_p), 1 - m)`. `local_shard` returns
the right tensor under every stage (the whole parameter under ZeRO 0-2), so teacher updates are written once.
To read a full teacher/EMA tensor under ZeRO-3 gather it with `deepspeed.zero.GatheredParameters` (collective).

Low precision: DeepSpeed's bf16/fp16 modes cast the whole module, frozen teachers included. Rounded to bf16
(8-bit significand), m·t + (1−m)·s loses every update smaller than 2^-9 of |t|, so at m = 0.996 a bf16 teacher
simply stops moving. `TeacherEMA` keeps an fp32 master of the teacher's local shards in that case.
"""

from __future__ import annotations

import torch
from torch import nn


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's storage of `param`: the ZeRO-3 partition when partitioned, else the full tensor."""
    shard = getattr(param, "ds_tensor", None)
    return shard if shard is not None else param.data


@torch.no_grad()
def ema_update_(targets, sources, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, on local shards (see the module docstring)."""
    for t, s in zip(targets, sources):
        ts, ss = local_shard(t), local_shard(s)
        ts.lerp_(ss.to(ts.dtype), 1.0 - momentum)


class TeacherEMA:
    """EMA of student parameters into a frozen teacher's, exact whatever dtype the teacher is stored in.

    An fp32 teacher is updated in place (no extra memory). A bf16/fp16 teacher gets an fp32 master of its local
    shards (4 bytes/param/world under ZeRO-3), updated in fp32 and copied into the teacher after every step. The
    master is per-rank state: save `state_dict()` with the rank's trainer state; a checkpoint without it (an fp32
    run, or another world size) restarts the master from the teacher's current values.
    """

    def __init__(self) -> None:
        self.master: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
        if len(teacher) != len(student):
            raise ValueError(f"teacher has {len(teacher)} parameters, student {len(student)}")
        shards = [local_shard(t) for t in teacher]
        if self.master is None and any(t.dtype != torch.float32 for t in shards):
            self.master = [t.detach().float().clone() for t in shards]
        if self.master is None:
            ema_update_(teacher, student, momentum)
            return
        for master, shard, s in zip(self.master, shards, student):
            master.lerp_(local_shard(s).float(), 1.0 - momentum)
            shard.copy_(master)

    def state_dict(self) -> dict:
        return {"master": self.master}

    def load_state_dict(self, state: dict, teacher: list[torch.Tensor]) -> str | None:
        """Restore the master; returns a warning (and drops the master) when it does not fit the teacher."""
        master = state.get("master")
        self.master = None
        if master is None:
            return None
        shards = [local_shard(t) for t in teacher]
        if len(master) != len(shards) or any(m.shape != t.shape for m, t in zip(master, shards)):
            return (
                "the checkpoint's fp32 teacher master does not fit this run's teacher shards (another world size "
                "or model); restarting it from the teacher's stored values"
            )
        self.master = [m.to(device=t.device, dtype=torch.float32).clone() for m, t in zip(master, shards)]
        return None


class WeightEMA:
    """An fp32 EMA of the trainable weights of `module`, kept per rank on its local shards.

    Under ZeRO 0-2 every rank keeps the full EMA (replicated); under ZeRO-3 each rank keeps the EMA of its own
    parameter slices, saved in its trainer state, so the EMA costs 4 bytes/param/world.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = [local_shard(params[n]).detach().float().clone() for n in self.names]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for shadow, name in zip(self.shadow, self.names):
            shadow.lerp_(local_shard(params[name]).float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "names": self.names, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise RuntimeError("EMA state does not match the model's trainable parameters")
        self.shadow = [t.clone() for t in state["shadow"]]
