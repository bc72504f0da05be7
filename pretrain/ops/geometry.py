"""The static description of one DCNv3 sampling pattern, shared by every backend.

Pairs are (height, width) throughout, as in `nn.Conv2d`; the official op's point order is width-major
(p = i*kh + j, i the width tap), which `taps()` encodes once for everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class DCNGeometry:
    """kernel/stride/pad/dilation as (h, w); `group` groups; `offset_scale` alpha; `remove_center`."""

    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    group: int = 1
    offset_scale: float = 1.0
    remove_center: bool = False

    @classmethod
    def make(cls, kernel_size=3, stride=1, pad=1, dilation=1, group=1, offset_scale=1.0, remove_center=False):
        geom = cls(
            _pair(kernel_size),
            _pair(stride),
            _pair(pad),
            _pair(dilation),
            int(group),
            float(offset_scale),
            bool(remove_center),
        )
        kh, kw = geom.kernel
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(
                f"DCNv3 needs odd kernel sizes (the center tap defines the grid), got {geom.kernel}"
            )
        if geom.group < 1 or min(geom.stride) < 1 or min(geom.dilation) < 1 or min(geom.pad) < 0:
            raise ValueError(f"invalid DCNv3 geometry {geom}")
        return geom

    @property
    def points(self) -> int:
        """Sampling points per group, P."""
        return self.kernel[0] * self.kernel[1] - int(self.remove_center)

    @property
    def center(self) -> tuple[int, int]:
        """c = d*(k-1)//2 per axis: where the regular grid is centred relative to the window corner."""
        return (self.dilation[0] * (self.kernel[0] - 1) // 2, self.dilation[1] * (self.kernel[1] - 1) // 2)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilation
        return (
            (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1,
            (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1,
        )

    def taps(self, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tap_x, tap_y), each (P,): the regular-grid displacement i*d_w - c_w, j*d_h - c_h of each point."""
        kh, kw = self.kernel
        i = torch.arange(kw, device=device).repeat_interleave(kh)  # width tap, major
        j = torch.arange(kh, device=device).repeat(kw)  # height tap, minor
        if self.remove_center:
            keep = (i != (kw - 1) // 2) | (j != (kh - 1) // 2)
            i, j = i[keep], j[keep]
        tap_x = (i * self.dilation[1] - self.center[1]).to(dtype)
        tap_y = (j * self.dilation[0] - self.center[0]).to(dtype)
        return tap_x, tap_y

    def check(self, value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> None:
        """Raise a ValueError naming the tensor whose shape disagrees with this geometry."""
        if value.dim() != 4 or offset.dim() != 4 or mask.dim() != 4:
            raise ValueError(
                "DCNv3 expects channels-last 4-D tensors: value (N,H,W,C), offset and mask (N,Ho,Wo,*)"
            )
        n, h, w, c = value.shape
        if c % self.group:
            raise ValueError(f"value has {c} channels, not divisible by group={self.group}")
        ho, wo = self.output_size(h, w)
        want_off = (n, ho, wo, self.group * self.points * 2)
        want_mask = (n, ho, wo, self.group * self.points)
        if tuple(offset.shape) != want_off:
            raise ValueError(f"offset has shape {tuple(offset.shape)}, expected {want_off} for {self}")
        if tuple(mask.shape) != want_mask:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {want_mask} for {self}")
