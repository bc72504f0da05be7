"""Reference for the fused DCN block hot path (the boundary of the CUDA kernel in csrc/).

Given `value = input_proj(X)` and `x1 = GELU(LN(dwconv(X)))`, both (N, H, W, C) channels-last:
    offset = x1 @ Wo^T + bo                              (N, H, W, G*P*2)
    mask   = softmax_P(x1 @ Wm^T + bm)                   (N, H, W, G*P), softmax per group over P points
    y      = core(value, offset, mask)                   (N, Ho, Wo, C)
    s      = sigmoid(x1 @ Wc^T + bc)                     (N, H, W, G), only with center-feature-scale
    y      = y * (1 - s) + value * s                     (s broadcast over each group's Cg channels)
    out    = y @ Wout^T + bout                           (N, Ho, Wo, C)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .geometry import DCNGeometry


@dataclass
class FusedParams:
    """The weights the fused op reads; the module's nn.Linear layers own them (official key names)."""

    offset_weight: torch.Tensor  # (G*P*2, C)
    offset_bias: torch.Tensor  # (G*P*2,)
    mask_weight: torch.Tensor  # (G*P, C)
    mask_bias: torch.Tensor  # (G*P,)
    output_weight: torch.Tensor  # (C, C)
    output_bias: torch.Tensor  # (C,)
    cfs_weight: torch.Tensor | None = None  # (G, C), center-feature-scale projection
    cfs_bias: torch.Tensor | None = None  # (G,)


def dcnv3_fused_reference(
    value: torch.Tensor, x1: torch.Tensor, params: FusedParams, geom: DCNGeometry, core=None
) -> torch.Tensor:
    """Composition of PyTorch ops with `core` (default: the reference aggregation) in the middle."""
    if core is None:
        from .reference import dcnv3_core_reference as core
    n, h, w, c = x1.shape
    offset = F.linear(x1, params.offset_weight, params.offset_bias)
    mask = F.linear(x1, params.mask_weight, params.mask_bias).view(n, h, w, geom.group, geom.points)
    mask = F.softmax(mask, dim=-1).view(n, h, w, geom.group * geom.points)
    y = core(value, offset, mask, geom)
    if params.cfs_weight is not None:
        if y.shape != value.shape:
            raise ValueError(
                "center-feature-scale needs stride 1 and 'same' padding (output shape == input shape)"
            )
        s = torch.sigmoid(F.linear(x1, params.cfs_weight, params.cfs_bias))  # (N, H, W, G)
        s = s.repeat_interleave(c // geom.group, dim=-1)
        y = y * (1 - s) + value * s
    return F.linear(y, params.output_weight, params.output_bias)
