"""EMA of weights that works under every ZeRO stage, and the helpers EMA teachers need.

Under ZeRO-3 a module's parameters are partitioned: between forward passes `p.data` is an empty placeholder and
each rank holds `p.ds_tensor`, its 1/world slice of the flattened parameter. That holds for *every* parameter
of the engine's module, frozen ones included, so an EMA teacher that lives inside the Objective is partitioned
too. Two parameters of the same shape are partitioned at the same offsets, so an EMA update is correct when it
runs on the local slices: `local_shard(teacher_p).lerp_(local_shard(student_p), 1 - m)`. `local_shard` returns
the right tensor under every stage (the whole parameter under ZeRO 0-2), so teacher updates are written once.
To read a full teacher/EMA tensor under ZeRO-3 gather it with `deepspeed.zero.GatheredParameters` (collective).
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
