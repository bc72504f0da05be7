"""Key schemes: the official InternImage keys (our canonical scheme), the HF port's, and module prefixes.

Internally every backbone state dict is held in the official scheme (`patch_embed.*`, `levels.{i}.*`,
`conv_head.*`/`head.*` or the H/G heads). The HF port prefixes `model.`, renames the layer-scale
parameters `gamma1/gamma2` to `layer_scale1/layer_scale2` and carries no head modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Top-level modules after the stages: the classification head of T–XL (`conv_head`, `head`) and the
# H/G pretraining/classification heads. The HF layout carries none of them.
HEAD_MODULES = ("conv_head", "head", "dcnv3_head_x4", "dcnv3_head_x3", "clip_projector", "fc_norm")
# The classifier proper: the only modules whose shapes depend on `num_classes`.
CLASSIFIER_MODULES = ("head",)

HF_PREFIX = "model."
_TO_HF = re.compile(r"\.gamma([12])$")
_FROM_HF = re.compile(r"\.layer_scale([12])$")

# A key that every InternImage state dict has, whatever the variant: used to find the backbone inside a
# bigger module (an Objective's `backbone.`, an EMA teacher's `teacher.backbone.`, ...).
ANCHOR_KEY = "patch_embed.conv1.weight"


def top_module(key: str) -> str:
    return key.split(".", 1)[0]


def is_head_key(key: str) -> bool:
    return top_module(key) in HEAD_MODULES


def is_classifier_key(key: str) -> bool:
    return top_module(key) in CLASSIFIER_MODULES


def official_to_hf(key: str) -> str:
    return HF_PREFIX + _TO_HF.sub(r".layer_scale\1", key)


def hf_to_official(key: str) -> str:
    if not key.startswith(HF_PREFIX):
        raise KeyError(f"{key!r} is not an HF-port key (they start with {HF_PREFIX!r})")
    return _FROM_HF.sub(r".gamma\1", key[len(HF_PREFIX) :])


def backbone_prefixes(keys: Iterable[str]) -> list[str]:
    """Every prefix P such that `P + ANCHOR_KEY` is a key: the InternImage backbones inside a state dict."""
    found = []
    for key in keys:
        if key == ANCHOR_KEY or key.endswith("." + ANCHOR_KEY):
            found.append(key[: len(key) - len(ANCHOR_KEY)])
    return sorted(found, key=lambda p: (p.count("."), p))


def choose_prefix(keys: Iterable[str], prefix: str | None) -> str:
    """The prefix of the backbone to extract: `prefix` if given (validated), else auto-detected.

    Auto-detection prefers the unprefixed backbone, then `backbone.` (the Objective's trained backbone, not
    an EMA teacher's copy), and refuses to guess between several other candidates.
    """
    keys = list(keys)
    candidates = backbone_prefixes(keys)
    if prefix is not None and prefix != "auto":
        if prefix and not prefix.endswith("."):
            prefix += "."
        if prefix + ANCHOR_KEY not in set(keys):
            have = ", ".join(repr(c) for c in candidates) or "none"
            raise ValueError(
                f"no InternImage backbone under prefix {prefix!r} (backbones found under: {have})"
            )
        return prefix
    if not candidates:
        sample = ", ".join(keys[:5])
        raise ValueError(
            f"no InternImage backbone found (no key ending in {ANCHOR_KEY!r}; first keys: {sample}); "
            "is this an InternImage checkpoint?"
        )
    for preferred in ("", "backbone.", "module.backbone.", "module."):
        if preferred in candidates:
            return preferred
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(f"several backbones found under prefixes {candidates}: choose one with --prefix")
