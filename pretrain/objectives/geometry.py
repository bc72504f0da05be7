"""Token geometry of the self-supervised term: block masks on the 16-px grid and view-relative positions.

Coordinates. A view is a crop box (x0, y0, x1, y1) of the original image in [0, 1] plus a horizontal-flip
flag, resized to the network input. A token (r, c) of an h×w map covers the view's cell centred at
((c + 0.5)/w, (r + 0.5)/h) in view coordinates, mirrored in x when the view is flipped. The decoder's *frame*
is the online (context) view: origin at its top-left corner, unit = one of its tokens. A target token's
position is its centre in the original image mapped into that frame, so the same scene point gets the same
position whichever view it comes from; its size relative to a context token (log scale x, y) and whether it
is mirrored relative to the context (flip xor) complete the geometry fed to the decoder.
"""

from __future__ import annotations

import math

import torch


def block_mask(
    batch: int,
    h: int,
    w: int,
    ratio: float,
    min_block: int = 4,
    aspect_min: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEiT-style blockwise mask: (batch, h, w) bool, True = token of image A, False = token from B.

    Random rectangles (area ≥ min_block tokens, aspect in [aspect_min, 1/aspect_min]) are added until
    round(ratio·h·w) tokens belong to B; single random tokens top up the exact count, so every sample has
    the same B share (both images then keep at least one token when 0 < ratio < 1).
    """
    total = h * w
    target = min(max(int(round(ratio * total)), 0), total)
    if 0.0 < ratio < 1.0:
        target = min(max(target, 1), total - 1)
    masks = torch.ones(batch, h, w, dtype=torch.bool)
    log_aspect = (math.log(aspect_min), -math.log(aspect_min))
    for n in range(batch):
        m = masks[n]
        taken, attempts = 0, 0
        while taken < target and attempts < 50:
            attempts += 1
            area = float(
                torch.empty(()).uniform_(min_block, max(min_block, target - taken), generator=generator)
            )
            aspect = math.exp(float(torch.empty(()).uniform_(*log_aspect, generator=generator)))
            bh = min(h, max(1, int(round(math.sqrt(area * aspect)))))
            bw = min(w, max(1, int(round(math.sqrt(area / aspect)))))
            top = int(torch.randint(0, h - bh + 1, (), generator=generator))
            left = int(torch.randint(0, w - bw + 1, (), generator=generator))
            block = m[top : top + bh, left : left + bw]
            new = int(block.sum())
            if new == 0 or taken + new > target:
                continue
            block.fill_(False)
            taken += new
        if taken < target:  # exact count: flip random remaining A tokens
            free = m.flatten().nonzero().squeeze(1)
            pick = free[torch.randperm(free.numel(), generator=generator)[: target - taken]]
            m.view(-1)[pick] = False
    return masks


def token_centres(box: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Original-image coordinates of every token centre of a view.

    box (B, 5) = (x0, y0, x1, y1, flip) -> x (B, h, w), y (B, h, w) in [0, 1] of the original image.
    """
    u = (torch.arange(w, dtype=box.dtype, device=box.device) + 0.5) / w
    v = (torch.arange(h, dtype=box.dtype, device=box.device) + 0.5) / h
    x0, y0, x1, y1, flip = box.unbind(-1)
    u = torch.where(flip[:, None] > 0.5, 1.0 - u[None, :], u[None, :])  # (B, w)
    x = x0[:, None] + u * (x1 - x0)[:, None]
    y = y0[:, None] + v[None, :] * (y1 - y0)[:, None]
    return x[:, None, :].expand(-1, h, -1), y[:, :, None].expand(-1, -1, w)


def relative_geometry(
    context_box: torch.Tensor, target_box: torch.Tensor, h: int, w: int, th: int, tw: int
) -> torch.Tensor:
    """Geometry of each target token in the context view's token frame.

    context_box, target_box (B, 5); the context map is h×w, the target map th×tw.
    Returns (B, th, tw, 5): (x, y) position in context-token units from the context view's top-left corner
    (a token centre of the context itself sits at c + 0.5, r + 0.5), log of the target token's width and
    height over the context token's, and the relative flip (1 when exactly one of the two views is flipped).
    """
    cx0, cy0, cx1, cy1, cflip = context_box.unbind(-1)
    tx, ty = token_centres(target_box, th, tw)
    u = (tx - cx0[:, None, None]) / (cx1 - cx0).clamp_min(1e-6)[:, None, None]
    u = torch.where(cflip[:, None, None] > 0.5, 1.0 - u, u)
    v = (ty - cy0[:, None, None]) / (cy1 - cy0).clamp_min(1e-6)[:, None, None]
    tx0, ty0, tx1, ty1, tflip = target_box.unbind(-1)
    log_sx = torch.log(((tx1 - tx0) / tw).clamp_min(1e-6) / ((cx1 - cx0) / w).clamp_min(1e-6))
    log_sy = torch.log(((ty1 - ty0) / th).clamp_min(1e-6) / ((cy1 - cy0) / h).clamp_min(1e-6))
    rel_flip = ((cflip > 0.5) ^ (tflip > 0.5)).to(context_box.dtype)
    expand = (-1, th, tw)
    return torch.stack(
        [
            u * w,
            v * h,
            log_sx[:, None, None].expand(*expand),
            log_sy[:, None, None].expand(*expand),
            rel_flip[:, None, None].expand(*expand),
        ],
        dim=-1,
    )


def grid_geometry(batch: int, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The context view's own tokens in its frame: (B, h, w, 5) with centres (c + 0.5, r + 0.5), scale 1, no flip."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype) + 0.5,
        torch.arange(w, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    zeros = torch.zeros_like(xs)
    geo = torch.stack([xs, ys, zeros, zeros, zeros], dim=-1)
    return geo[None].expand(batch, -1, -1, -1)


def sincos_2d(xy: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Continuous 2-D sine-cosine embedding (MAE's, at real-valued positions): (..., 2) -> (..., dim)."""
    if dim % 4:
        raise ValueError(f"sincos dim {dim} must be divisible by 4")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, device=xy.device, dtype=torch.float32) / quarter)
    x = xy[..., 0:1].float() * omega
    y = xy[..., 1:2].float() * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)
