"""Tiny objectives and batches shared by the tests of pretrain.objectives (CPU-sized)."""

from __future__ import annotations

import torch

from pretrain.models import InternImage
from pretrain.objectives import ObjectiveConfig, build_objective
from pretrain.objectives.config import DenseConfig, MixConfig, SemanticConfig, TextConfig

NAMES = ["circle", "square", "triangle", "diamond", "star", "cross"]
CAPTIONS = [f"a photo of {n} {c} {s}s." for n in ("two", "three") for c in ("red", "blue") for s in NAMES]


def tiny_backbone(clip: bool = False) -> InternImage:
    return InternImage(
        channels=16,
        depths=[1, 1, 2, 1],
        groups=[1, 2, 4, 8],
        num_classes=0,
        drop_path_rate=0.0,
        use_clip_projector=clip,
    )


def tiny_cfg(name: str = "m3i", **over) -> ObjectiveConfig:
    sem = dict(embed_dim=64, pool_heads=4) | over.pop("semantic", {})
    dense = dict(projector_dim=32, decoder_width=64, decoder_depth=1, decoder_heads=4) | over.pop("dense", {})
    mix = dict(ratio=0.5, min_block=2) | over.pop("mix", {})
    text = dict(context_length=24, width=64, depth=1, heads=4, vocab_size=300) | over.pop("text", {})
    return ObjectiveConfig(
        name=name,
        semantic=SemanticConfig(**sem),
        dense=DenseConfig(**dense),
        mix=MixConfig(**mix),
        text=TextConfig(**text),
        **over,
    )


def tiny_m3i(name: str = "m3i", clip: bool = False, **over):
    torch.manual_seed(0)
    return build_objective(
        tiny_cfg(name, **over), tiny_backbone(clip), {"label_names": NAMES, "captions_iter": CAPTIONS}
    )


def fake_batch(n: int = 6, size: int = 64, seed: int = 0, views: int = 2) -> dict:
    """Random pixels with the full batch layout (labels, captions, two views with boxes, one invalid row)."""
    g = torch.Generator().manual_seed(seed)
    batch = {
        "image": torch.randn(n, 3, size, size, generator=g),
        "label": torch.randint(0, len(NAMES), (n,), generator=g),
        "caption": [CAPTIONS[int(i)] for i in torch.randint(0, len(CAPTIONS), (n,), generator=g)],
        "has_caption": torch.ones(n, dtype=torch.bool),
        "source": torch.zeros(n, dtype=torch.long),
        "valid": torch.ones(n, dtype=torch.bool),
    }
    batch["label"][1] = -1
    batch["has_caption"][2] = False
    batch["caption"][2] = ""
    batch["valid"][n - 1] = False
    lo = torch.rand(n, views, 2, generator=g) * 0.3
    hi = lo + 0.5 + torch.rand(n, views, 2, generator=g) * 0.2
    flip = (torch.rand(n, views, 1, generator=g) < 0.5).float()
    batch["view_boxes"] = torch.cat([lo, hi, flip], dim=-1)
    if views == 2:
        batch["image2"] = torch.randn(n, 3, size, size, generator=g)
    return batch
