"""InternImage models, key-for-key compatible with the official checkpoints."""

from .dcnv3 import DCNv3
from .flops import FlopsReport, count_flops  # noqa: E402  (after the registry it uses)
from .internimage import (
    DCN_LR_KEYWORDS,
    InternImage,
    InternImageLayer,
    InternImageStage,
    check_model_kwargs,
    lr_decay_ratios,
    lr_scale,
)
from .registry import VARIANTS, create_model, list_models, variant_config

__all__ = [
    "DCN_LR_KEYWORDS",
    "DCNv3",
    "InternImage",
    "InternImageLayer",
    "InternImageStage",
    "VARIANTS",
    "FlopsReport",
    "check_model_kwargs",
    "count_flops",
    "create_model",
    "list_models",
    "lr_decay_ratios",
    "lr_scale",
    "variant_config",
]
