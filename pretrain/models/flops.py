"""Per-image FLOPs of an InternImage, counted on the meta device (no memory, no compute, any size).

We count multiply-accumulates (MACs), the unit the InternImage paper calls "FLOPs", and report
FLOPs = 2 x MACs beside them. Counted: every Conv2d and Linear (weights x outputs), the two attention
matmuls of the H/G CLIP projector, and the DCNv3 sampling: per output pixel, group point and channel, 4 MACs
of bilinear interpolation + 1 of mask weighting (5 per point-channel, the convention of the official
InternImage FLOPs script). Norms, activations, softmax and pooling are not counted (elementwise, <1%).
A training step costs ~3x the forward (forward + backward of activations and of weights): `train_flops`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .dcnv3 import DCNv3
from .heads import CrossAttention
from .internimage import InternImage
from .registry import create_model

DCN_MACS_PER_POINT_CHANNEL = 5


@dataclass
class FlopsReport:
    model: str
    img_size: int
    params: int
    macs_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return sum(self.macs_by_kind.values())

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def train_flops(self) -> int:
        """FLOPs of one training step per image (forward + backward = 3x forward), the MFU numerator."""
        return 3 * self.flops

    def table(self) -> str:
        rows = [
            f"model {self.model} @ {self.img_size}px  (per image; MACs = the paper's 'FLOPs')",
            f"  params            {self.params:>16,d}",
        ]
        for kind, macs in sorted(self.macs_by_kind.items(), key=lambda kv: -kv[1]):
            rows.append(f"  MACs {kind:<12} {macs / 1e9:>14.3f} G")
        rows += [
            f"  MACs total        {self.macs / 1e9:>14.3f} G",
            f"  FLOPs (2xMACs)    {self.flops / 1e9:>14.3f} G",
            f"  train FLOPs (3x)  {self.train_flops / 1e9:>14.3f} G",
        ]
        return "\n".join(rows)


def _per_image(total: int, batch: int) -> int:
    return total // batch


def count_flops(model: str | InternImage, img_size: int = 224, **overrides) -> FlopsReport:
    """Count MACs of one forward at `img_size` for a variant name or a model (rebuilt on meta from its config)."""
    name = model if isinstance(model, str) else getattr(model, "variant", "custom")
    with torch.device("meta"):
        if isinstance(model, str):
            net = create_model(model, **overrides)
        else:
            net = InternImage(**{**model.config, **overrides})
    net.eval()
    macs: dict[str, int] = defaultdict(int)
    batch = 1

    def conv_hook(m: nn.Conv2d, inputs, out):
        kh, kw = m.kernel_size
        macs["conv"] += _per_image(out.numel() * (m.in_channels // m.groups) * kh * kw, batch)

    def linear_hook(m: nn.Linear, inputs, out):
        macs["linear"] += _per_image(out.numel() * m.in_features, batch)

    def dcn_hook(m: DCNv3, inputs, out):
        n, ho, wo, c = out.shape
        macs["dcn_sampling"] += _per_image(
            n * ho * wo * m.geom.points * c * DCN_MACS_PER_POINT_CHANNEL, batch
        )
        if m.center_feature_scale:  # its projection is a functional linear, not an nn.Linear
            macs["linear"] += _per_image(n * ho * wo * m.group * c, batch)

    def attn_hook(m: CrossAttention, inputs, out):
        q, k = inputs[0], inputs[1]
        b, nq, d = q.shape
        macs["attention"] += _per_image(2 * b * nq * k.shape[1] * d, batch)
        # q/k/v projections are functional (shared-bias F.linear); proj is an nn.Linear, counted by its hook.
        macs["linear"] += _per_image(b * (nq + 2 * k.shape[1]) * d * d, batch)

    def dcn_proj_hook(m: DCNv3, inputs, out):
        # input_proj is an nn.Linear call (counted by its hook); offset/mask/output_proj run inside the
        # fused op as functional linears, so they are counted here from the shapes.
        n, h, w, c = inputs[0].shape
        pts = m.group * m.geom.points
        macs["linear"] += _per_image(n * h * w * c * (3 * pts) + out.numel() // c * c * c, batch)

    hooks = []
    for mod in net.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, DCNv3):
            hooks.append(mod.register_forward_hook(dcn_hook))
            hooks.append(mod.register_forward_hook(dcn_proj_hook))
        elif isinstance(mod, CrossAttention):
            hooks.append(mod.register_forward_hook(attn_hook))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            net(torch.empty(batch, 3, img_size, img_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return FlopsReport(name, img_size, sum(p.numel() for p in net.parameters()), dict(macs))
