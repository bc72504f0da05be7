"""Small building blocks of InternImage, laid out so that parameter names match the official checkpoints.

Norm layers are `nn.Sequential`s with explicit layout permutes (the official design), which is why the
official keys read `norm1.0.weight` for a channels-last LayerNorm and `norm.1.weight` after a
`channels_first -> channels_last` permute. Every LayerNorm uses eps 1e-6; BatchNorm appears only in the
T–XL classification head.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.alignment import aligned16


class ToChannelsFirst(nn.Module):
    """(N, H, W, C) -> (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class ToChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H, W, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def build_norm_layer(
    dim: int,
    norm_layer: str,
    in_format: str = "channels_last",
    out_format: str = "channels_last",
    eps: float = 1e-6,
) -> nn.Sequential:
    """LayerNorm ("LN") or BatchNorm ("BN") wrapped with the permutes the layouts need."""
    layers: list[nn.Module] = []
    if norm_layer == "BN":
        if in_format == "channels_last":
            layers.append(ToChannelsFirst())
        layers.append(nn.BatchNorm2d(dim))
        if out_format == "channels_last":
            layers.append(ToChannelsLast())
    elif norm_layer == "LN":
        if in_format == "channels_first":
            layers.append(ToChannelsLast())
        layers.append(nn.LayerNorm(dim, eps=eps))
        if out_format == "channels_first":
            layers.append(ToChannelsFirst())
    else:
        raise ValueError(f"norm_layer must be 'LN' or 'BN', got {norm_layer!r}")
    return nn.Sequential(*layers)


def build_act_layer(act_layer: str) -> nn.Module:
    if act_layer == "GELU":
        return nn.GELU()
    if act_layer == "ReLU":
        return nn.ReLU(inplace=True)
    if act_layer == "SiLU":
        return nn.SiLU(inplace=True)
    raise ValueError(f"act_layer must be one of 'GELU', 'ReLU', 'SiLU', got {act_layer!r}")


class DropPath(nn.Module):
    """Stochastic depth per sample, rescaled by 1/keep so the expectation is unchanged (timm semantics)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class AlignedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state-dict keys) whose weight and bias reach the convolution 16-byte
    aligned: under DeepSpeed ZeRO-3 they are views into a flat buffer, often 8-byte aligned in bf16, which cuDNN's
    engines refuse (pretrain.ops.alignment). An aligned parameter passes as is; a misaligned one is copied."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = aligned16(self.bias) if self.bias is not None else None
        return self._conv_forward(x, aligned16(self.weight), bias)


class StemLayer(nn.Module):
    """Two stride-2 3x3 convs: (N, 3, H, W) -> (N, H/4, W/4, C) channels-last."""

    def __init__(
        self, in_chans: int = 3, out_chans: int = 96, act_layer: str = "GELU", norm_layer: str = "LN"
    ):
        super().__init__()
        self.conv1 = AlignedConv2d(in_chans, out_chans // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = build_norm_layer(out_chans // 2, norm_layer, "channels_first", "channels_first")
        self.act = build_act_layer(act_layer)
        self.conv2 = AlignedConv2d(out_chans // 2, out_chans, kernel_size=3, stride=2, padding=1)
        self.norm2 = build_norm_layer(out_chans, norm_layer, "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class DownsampleLayer(nn.Module):
    """Stride-2 3x3 conv doubling channels: (N, H, W, C) -> (N, H/2, W/2, 2C)."""

    def __init__(self, channels: int, norm_layer: str = "LN"):
        super().__init__()
        self.conv = AlignedConv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = build_norm_layer(2 * channels, norm_layer, "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


class MLPLayer(nn.Module):
    """Point-wise FFN on channels-last tensors."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: str = "GELU", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = build_act_layer(act_layer)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
