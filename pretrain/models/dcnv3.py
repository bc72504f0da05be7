"""The DCNv3 module: point-wise projections around the deformable aggregation (official keys and math).

    value  = input_proj(X)                                   (N, H, W, C)
    x1     = GELU(LN(depthwise_conv_k(X)))                   (N, H, W, C)   on the raw input
    offset = offset(x1); mask = softmax_P(mask(x1))          per group
    y      = core(value, offset, mask)
    y      = y * (1 - s) + value * s,  s = sigmoid(x1 Wc^T + bc)    only with center_feature_scale
    out    = output_proj(y)

Everything after `value` and `x1` is one call to `pretrain.ops.dcnv3_fused`, so a fused kernel can take
the whole hot path while the nn.Linear layers stay the owners of the weights (and of their key names).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import DCNGeometry, FusedParams, dcnv3_fused
from .layers import AlignedConv2d, build_act_layer, build_norm_layer


class DCNv3(nn.Module):
    """Args follow the official `DCNv3` module; `backend` picks the op implementation (see pretrain.ops)."""

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if channels % group != 0:
            raise ValueError(f"channels ({channels}) must be divisible by group ({group})")
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.channels = channels
        self.group = group
        self.group_channels = channels // group
        self.center_feature_scale = center_feature_scale
        self.backend = backend
        self.geom = DCNGeometry.make(kernel_size, stride, pad, dilation, group, offset_scale, remove_center)
        points = self.geom.points

        self.dw_conv = nn.Sequential(
            AlignedConv2d(
                channels,
                channels,
                dw_kernel_size,
                stride=1,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
            ),
            build_norm_layer(channels, norm_layer, "channels_first", "channels_last"),
            build_act_layer(act_layer),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: zero offsets and uniform masks at start (the op begins as a regular 3x3 conv)."""
        for layer in (self.offset, self.mask):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.center_feature_scale:
            nn.init.zeros_(self.center_feature_scale_proj_weight)
            nn.init.zeros_(self.center_feature_scale_proj_bias)

    def fused_params(self) -> FusedParams:
        cfs = self.center_feature_scale
        return FusedParams(
            offset_weight=self.offset.weight,
            offset_bias=self.offset.bias,
            mask_weight=self.mask.weight,
            mask_bias=self.mask.bias,
            output_weight=self.output_proj.weight,
            output_bias=self.output_proj.bias,
            cfs_weight=self.center_feature_scale_proj_weight if cfs else None,
            cfs_bias=self.center_feature_scale_proj_bias if cfs else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, H, W, C) channels-last -> (N, Ho, Wo, C)."""
        value = self.input_proj(x)
        x1 = self.dw_conv(x.permute(0, 3, 1, 2))
        return dcnv3_fused(value, x1, self.fused_params(), self.geom, backend=self.backend)

    def extra_repr(self) -> str:
        g = self.geom
        return (
            f"channels={self.channels}, group={g.group}, kernel={g.kernel}, stride={g.stride}, pad={g.pad}, "
            f"dilation={g.dilation}, offset_scale={g.offset_scale}, remove_center={g.remove_center}, "
            f"center_feature_scale={self.center_feature_scale}, backend={self.backend!r}"
        )
