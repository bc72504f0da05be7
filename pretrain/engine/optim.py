"""AdamW parameter groups with the official InternImage semantics, and the per-step lr schedule.

Groups (official `build_optimizer`): no weight decay for 1-D parameters and biases; under layer-wise decay a
parameter's lr is scaled by the ratio of the first keyword of `pretrain.models.lr_decay_ratios` contained in
its name; DCN offset/mask projections (`pretrain.models.DCN_LR_KEYWORDS`) get `dcn_lr_mul` on top. Both only
apply to the backbone's parameters; objective heads (classifier, text tower, predictor) keep ratio 1.

The lr is not held by a scheduler object: the trainer sets `group["lr"] = peak * group["lr_scale"] *
lr_factor(step)` before every optimizer step, so a resumed run needs nothing but the step number.
"""

from __future__ import annotations

import math

from torch import nn

from ..config import OptimConfig, ScheduleConfig


def frozen_parameter_ids(objective: nn.Module) -> set[int]:
    names = objective.frozen_module_names() if hasattr(objective, "frozen_module_names") else ()
    ids: set[int] = set()
    for name in names:
        ids.update(id(p) for p in objective.get_submodule(name).parameters())
    return ids


def param_groups(objective: nn.Module, cfg: OptimConfig, backbone_prefix: str = "backbone.") -> list[dict]:
    """Parameter groups for AdamW; each dict has `params`, `weight_decay` and `lr_scale`."""
    from pretrain.models import DCN_LR_KEYWORDS, lr_decay_ratios, lr_scale

    backbone = getattr(objective, "backbone", None)
    ratios = (
        lr_decay_ratios(backbone, cfg.layer_decay) if backbone is not None and cfg.layer_decay != 1.0 else {}
    )
    frozen = frozen_parameter_ids(objective)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in objective.named_parameters():
        if not param.requires_grad or id(param) in frozen:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        scale = 1.0
        if name.startswith(backbone_prefix):
            inner = name[len(backbone_prefix) :]
            scale = lr_scale(inner, ratios) if ratios else 1.0
            if cfg.dcn_lr_mul != 1.0 and any(k in inner for k in DCN_LR_KEYWORDS):
                scale *= cfg.dcn_lr_mul
        wd = 0.0 if no_decay else cfg.weight_decay
        group = groups.setdefault((wd, scale), {"params": [], "weight_decay": wd, "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def lr_factor(step: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.warmup_init_ratio + (1.0 - cfg.warmup_init_ratio) * step / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The official linear scaling rule: lr * global_batch / lr_ref_batch (or lr as is)."""
    if cfg.lr_ref_batch:
        return cfg.lr * global_batch / cfg.lr_ref_batch
    return cfg.lr


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
