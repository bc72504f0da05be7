"""DCNv3 core op in vectorised pure PyTorch: the oracle every other backend is tested against.

Semantics (official InternImage DCNv3, checked against its CUDA op and `dcnv3_core_pytorch`):

* `value`  (N, H, W, G*Cg)  channels-last, group g owns channels [g*Cg, (g+1)*Cg).
* `offset` (N, Ho, Wo, G*P*2): index g*2P + 2p + 0 is the x (width) offset of point p, + 1 the y (height).
* `mask`   (N, Ho, Wo, G*P): index g*P + p, already softmax-normalised over P by the caller.
* Point p = i*kh + j with i the width tap and j the height tap (i-major); with `remove_center` the center
  tap (i, j) = ((kw-1)/2, (kh-1)/2) is dropped and the remaining points keep their order.
* With c = d*(k-1)//2 and alpha = offset_scale, point p of output pixel (ho, wo) samples
      w = wo*s - pad + c + (i*d - c + dx) * alpha,   h = ho*s - pad + c + (j*d - c + dy) * alpha
  bilinearly with zeros outside the image; that equals `grid_sample(align_corners=False,
  padding_mode="zeros")` on pixel centres. Note alpha scales the regular grid too (L/XL use 2.0).
* Output (N, Ho, Wo, G*Cg) = sum_p mask_p * sample_p, per group.

Zero padding is implicit: sampling outside the unpadded image already returns 0, so the input is never
padded or copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import DCNGeometry


def sampling_locations(
    geom: DCNGeometry, offset: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (x, y) of every sampling point, each (N, Ho, Wo, G, P), in the unpadded image."""
    n, ho, wo, _ = offset.shape
    dtype, device = offset.dtype, offset.device
    tap_x, tap_y = geom.taps(dtype=dtype, device=device)  # (P,), (P,): i*d - c and j*d - c
    base_x = torch.arange(wo, dtype=dtype, device=device) * geom.stride[1] - geom.pad[1] + geom.center[1]
    base_y = torch.arange(ho, dtype=dtype, device=device) * geom.stride[0] - geom.pad[0] + geom.center[0]
    off = offset.view(n, ho, wo, geom.group, geom.points, 2)
    alpha = geom.offset_scale
    x = base_x.view(1, 1, wo, 1, 1) + (tap_x + off[..., 0]) * alpha
    y = base_y.view(1, ho, 1, 1, 1) + (tap_y + off[..., 1]) * alpha
    return x, y


def dcnv3_core_reference(
    value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geom: DCNGeometry
) -> torch.Tensor:
    """DCNv3 aggregation. Shapes in the module docstring; returns (N, Ho, Wo, G*Cg) in value's dtype."""
    geom.check(value, offset, mask)
    n, h, w, channels = value.shape
    g, p = geom.group, geom.points
    cg = channels // g
    _, ho, wo, _ = offset.shape
    # grid_sample wants one dtype; under autocast the three inputs may differ (bf16 value, fp32 offset).
    dtype = torch.promote_types(torch.promote_types(value.dtype, offset.dtype), mask.dtype)
    value_, offset_, mask_ = value.to(dtype), offset.to(dtype), mask.to(dtype)

    x, y = sampling_locations(geom, offset_, h, w)
    # Pixel -> normalised coordinates of grid_sample(align_corners=False): u = (2x + 1) / W - 1.
    grid = torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1)  # (N, Ho, Wo, G, P, 2)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * g, ho, wo * p, 2)
    planes = value_.view(n, h, w, g, cg).permute(0, 3, 4, 1, 2).reshape(n * g, cg, h, w)
    if planes.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        # torch's CPU grid_sample returns NaN for 16-bit inputs that are not contiguous, and with N = 1 the
        # reshape above is such a view (torch 2.13; float32 and CUDA are fine, so only this case pays a copy).
        planes, grid = planes.contiguous(), grid.contiguous()
    sampled = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(n, g, cg, ho, wo, p)
    weights = mask_.view(n, ho, wo, g, p).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (N, G, 1, Ho, Wo, P)
    out = (sampled * weights).sum(-1)  # (N, G, Cg, Ho, Wo)
    return out.permute(0, 3, 4, 1, 2).reshape(n, ho, wo, channels).to(value.dtype)
