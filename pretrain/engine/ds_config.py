"""The DeepSpeed JSON config, generated from our `engine`/`optim` sections (a raw JSON may override it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import RunConfig


def merge(base: dict, extra: dict) -> dict:
    """Recursive merge: `extra` wins; nested mappings are merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build_ds_config(
    cfg: RunConfig, micro_batch: int, world_size: int, lr: float, load_universal: bool = False
) -> dict:
    """DeepSpeed config for `deepspeed.initialize` (the optimizer too: DeepSpeed builds it from our groups).

    On CPU the AdamW is torch's (`torch_adam`): DeepSpeed's FusedAdam needs a CUDA build. With optimizer
    offload DeepSpeed uses its CPUAdam (built on first use). `load_universal`: the run resumes from a universal
    checkpoint (DeepSpeed reads that flag at initialize time, so the resume target is resolved before).
    """
    e = cfg.engine
    if e.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage must be 0..3, got {e.zero_stage}")
    if e.offload_param and e.zero_stage != 3:
        raise ValueError("engine.offload_param needs engine.zero_stage=3")
    if e.offload_optimizer and e.zero_stage == 0:
        raise ValueError("engine.offload_optimizer needs engine.zero_stage >= 1")
    cuda = torch.cuda.is_available()
    zero: dict = {"stage": e.zero_stage}
    if e.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=cuda, reduce_scatter=True)
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if e.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    adam = {
        "lr": lr,
        "betas": list(cfg.optim.betas),
        "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay,
    }
    if not e.offload_optimizer:
        adam["torch_adam"] = not cuda
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": e.grad_accum,
        "train_batch_size": micro_batch * e.grad_accum * world_size,
        "gradient_clipping": float(e.clip_grad or 0.0),
        "steps_per_print": 10**9,  # our monitor logs; DeepSpeed's own prints stay quiet
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {
            "enabled": e.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "optimizer": {"type": "AdamW", "params": adam},
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if e.deepspeed_config:
        ds = merge(ds, json.loads(Path(e.deepspeed_config).read_text()))
    return ds
