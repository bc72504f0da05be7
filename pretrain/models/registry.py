"""The InternImage variants with their official settings, and `create_model` / `list_models`.

Settings are the official classification configs (InternImage repo, `classification/configs`); the
drop-path rates are those of the ImageNet-1K recipes (T/S/B trained from scratch, L/XL/H/G fine-tuned).
Parameter counts at 1000 classes (checked in tests): T 29,918,424 · S 50,079,880 · B 97,461,832 ·
L 223,334,810 · XL 334,819,780 · H 1,089,636,760 · G 3,076,373,352.
"""

from __future__ import annotations

import copy
import difflib

from .internimage import InternImage, check_model_kwargs

_H_G_COMMON = dict(
    offset_scale=1.0,
    mlp_ratio=4.0,
    layer_scale=None,
    dw_kernel_size=5,
    level2_post_norm=True,
    center_feature_scale=True,
    use_clip_projector=True,
)

VARIANTS: dict[str, dict] = {
    "internimage_t": dict(
        channels=64,
        depths=[4, 4, 18, 4],
        groups=[4, 8, 16, 32],
        offset_scale=1.0,
        mlp_ratio=4.0,
        layer_scale=None,
        post_norm=False,
        drop_path_rate=0.1,
    ),
    "internimage_s": dict(
        channels=80,
        depths=[4, 4, 21, 4],
        groups=[5, 10, 20, 40],
        offset_scale=1.0,
        mlp_ratio=4.0,
        layer_scale=1e-5,
        post_norm=True,
        drop_path_rate=0.4,
    ),
    "internimage_b": dict(
        channels=112,
        depths=[4, 4, 21, 4],
        groups=[7, 14, 28, 56],
        offset_scale=1.0,
        mlp_ratio=4.0,
        layer_scale=1e-5,
        post_norm=True,
        drop_path_rate=0.5,
    ),
    "internimage_l": dict(
        channels=160,
        depths=[5, 5, 22, 5],
        groups=[10, 20, 40, 80],
        offset_scale=2.0,
        mlp_ratio=4.0,
        layer_scale=1e-5,
        post_norm=True,
        drop_path_rate=0.1,
    ),
    "internimage_xl": dict(
        channels=192,
        depths=[5, 5, 24, 5],
        groups=[12, 24, 48, 96],
        offset_scale=2.0,
        mlp_ratio=4.0,
        layer_scale=1e-5,
        post_norm=True,
        drop_path_rate=0.2,
    ),
    "internimage_h": dict(
        channels=320,
        depths=[6, 6, 32, 6],
        groups=[10, 20, 40, 80],
        post_norm=False,
        res_post_norm=True,
        level2_post_norm_block_ids=[5, 11, 17, 23, 29],
        drop_path_rate=0.2,
        **_H_G_COMMON,
    ),
    "internimage_g": dict(
        channels=512,
        depths=[2, 2, 48, 4],
        groups=[16, 32, 64, 128],
        post_norm=True,
        res_post_norm=False,
        level2_post_norm_block_ids=[5, 11, 17, 23, 29, 35, 41, 47],
        drop_path_rate=0.4,
        **_H_G_COMMON,
    ),
}


def list_models() -> list[str]:
    return list(VARIANTS)


def variant_config(name: str, **overrides) -> dict:
    """The constructor keywords of a variant with `overrides` applied (validated)."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, list(VARIANTS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (available: {', '.join(VARIANTS)})")
    check_model_kwargs(overrides)
    config = copy.deepcopy(VARIANTS[name])
    config.update(overrides)
    return config


def create_model(name: str, **overrides) -> InternImage:
    """Build a registered variant, e.g. `create_model("internimage_t", num_classes=10, with_cp=True)`."""
    model = InternImage(**variant_config(name, **overrides))
    model.variant = name
    return model
