"""Objectives: supervised classification, image-text contrastive, self-supervised, and their M3I composition.

`build_objective(cfg, model, data_info)` is the one entry point the engine calls; the returned `Objective`
owns the backbone and every head (see `base.py` for the contract and batch layout).
"""

from __future__ import annotations

from torch import nn

from .base import Objective
from .config import ObjectiveConfig


def build_objective(cfg: ObjectiveConfig, model: nn.Module, data_info: dict | None = None) -> Objective:
    """Build the objective named by `cfg.name` around `model` (an InternImage with `forward_features`).

    data_info keys (all optional unless a term needs them): `num_classes` (int; supervised needs it),
    `label_names` (list[str], index = label; class-name prompts need it), `captions_iter` (a callable
    returning an iterator of caption strings, or such an iterable; used to train the BPE tokenizer when
    `cfg.text.tokenizer` does not exist yet), `rank` (int; only rank 0 writes a trained tokenizer), `world_size` (int; a missing tokenizer is
    trained only when it is 1).
    """
    data_info = dict(data_info or {})
    if cfg.name == "supervised":
        from .supervised import SupervisedObjective

        num_classes = int(data_info.get("num_classes") or len(data_info.get("label_names") or ()))
        return SupervisedObjective(cfg, model, num_classes)
    from .m3i import M3IObjective

    return M3IObjective(cfg, model, data_info)


__all__ = ["Objective", "ObjectiveConfig", "build_objective"]
