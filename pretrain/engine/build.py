"""How the trainer's components are built from a `RunConfig`: seeds, the backbone, the device batch.

Kept apart from the loop (`trainer.py`) so that commands which only build a model (`pretrain eval`) do not
import the loop.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..config import ConfigError, RunConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: RunConfig):
    """The backbone named by `model` (and its initial weights)."""
    from pretrain.convert import ConvertError, load_pretrained
    from pretrain.models import create_model

    m = cfg.model
    kwargs = dict(m.overrides)
    kwargs.update(num_classes=m.num_classes, dcn_backend=m.dcn_backend, with_cp=m.with_cp)
    if m.drop_path_rate is not None:
        kwargs["drop_path_rate"] = m.drop_path_rate
    try:
        model = create_model(m.variant, **kwargs)
    except KeyError as err:  # an unregistered variant (the message names the closest one)
        raise ConfigError(f"model.variant: {err.args[0]}") from None
    except (TypeError, ValueError) as err:  # a constructor option: a typo or a bad value in model.overrides
        raise ConfigError(f"model.overrides: {err}") from None
    if m.init_from:
        try:
            load_pretrained(m.init_from, model, strict=True, drop_head=m.init_drop_head)
        except (ConvertError, OSError) as err:
            raise ConfigError(f"model.init_from: {err}") from None
    return model


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to the device; images (4-D floats) to the engine's compute dtype, other floats untouched."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and value.dim() == 4:
                value = value.to(dtype)
        out[key] = value
    return out


def check_precision_supported(precision: str) -> None:
    """Fail before any work with a config error, not deep inside deepspeed.initialize, when the device cannot
    run the precision (DeepSpeed's CPU accelerator has bf16 and fp32 but no fp16)."""
    if precision != "fp16":
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        raise ConfigError(
            f"engine.precision=fp16 is not supported by DeepSpeed's {accelerator.device_name()!r} accelerator "
            "(fp16 with loss scaling needs a GPU): use engine.precision=bf16 or fp32"
        )
