"""The DeepSpeed JSON config, generated from our `engine`/`optim` sections (a raw JSON may override it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig


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
    e = cfg.engine  # its ranges (stage 0-3, offload needs ZeRO) are checked when the config loads
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
        ds = merge(ds, read_raw_config(e.deepspeed_config))
        check_batch_sizes(ds, world_size)
    return ds


def read_raw_config(path: str) -> dict:
    """`engine.deepspeed_config`: a JSON object; a missing or broken file is a ConfigError naming the key."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"engine.deepspeed_config: cannot read {path} ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"engine.deepspeed_config: {path} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"engine.deepspeed_config: {path} must hold a JSON object")
    return raw


def check_batch_sizes(ds: dict, world_size: int) -> None:
    """DeepSpeed asserts train_batch_size == micro x accumulation x ranks deep inside initialize: say which
    keys disagree before that."""
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if ds["train_batch_size"] != micro * accum * world_size:
        raise ConfigError(
            f"engine.deepspeed_config: train_batch_size {ds['train_batch_size']} != micro-batch {micro} x "
            f"gradient_accumulation_steps {accum} x {world_size} ranks; drop the batch keys from the JSON and "
            "set the stream's batch size and engine.grad_accum instead"
        )
