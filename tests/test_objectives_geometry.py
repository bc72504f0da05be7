"""Block masks on the 16-px grid and target positions relative to the context view (crop, scale, flip)."""

from __future__ import annotations

import math

import torch

from pretrain.objectives.geometry import block_mask, grid_geometry, relative_geometry, token_centres


def test_block_mask_exact_ratio_and_blocks():
    g = torch.Generator().manual_seed(0)
    m = block_mask(16, 14, 14, 0.5, min_block=16, generator=g)
    assert m.shape == (16, 14, 14) and m.dtype == torch.bool
    assert ((~m).flatten(1).sum(1) == 98).all()  # exactly round(0.5 * 196) tokens from B per sample
    # blockwise: most B tokens have a B neighbour (random single tokens would have ~2 of 4 on average)
    b = (~m).float()
    nb = torch.zeros_like(b)
    nb[:, 1:] += b[:, :-1]
    nb[:, :-1] += b[:, 1:]
    nb[:, :, 1:] += b[:, :, :-1]
    nb[:, :, :-1] += b[:, :, 1:]
    assert (nb[b > 0] >= 2).float().mean() > 0.8
    tiny = block_mask(4, 2, 2, 0.5, generator=g)
    assert ((~tiny).flatten(1).sum(1) == 2).all()


def test_identical_view_maps_to_own_grid():
    box = torch.tensor([[0.1, 0.2, 0.7, 0.9, 0.0], [0.1, 0.2, 0.7, 0.9, 1.0]])
    geo = relative_geometry(box, box, 4, 4, 4, 4)
    torch.testing.assert_close(geo, grid_geometry(2, 4, 4))


def test_flip_mirrors_x_and_sets_relative_flip():
    ctx = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])
    tgt = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    geo = relative_geometry(ctx, tgt, 4, 4, 4, 4)[0]
    grid = grid_geometry(1, 4, 4)[0]
    torch.testing.assert_close(
        geo[..., 0], 4.0 - grid[..., 0]
    )  # column c of the flipped view is column 3 - c
    torch.testing.assert_close(geo[..., 1], grid[..., 1])
    assert (geo[..., 4] == 1).all() and (geo[..., 2:4] == 0).all()
    # both flipped: no relative flip, positions equal the grid again
    geo2 = relative_geometry(tgt, tgt, 4, 4, 4, 4)[0]
    torch.testing.assert_close(geo2, grid)


def test_crop_and_scale():
    # target = the top-left quarter of the context view, at the same resolution: tokens are half as large
    ctx = torch.tensor([[0.2, 0.2, 0.6, 0.6, 0.0]])
    tgt = torch.tensor([[0.2, 0.2, 0.4, 0.4, 0.0]])
    geo = relative_geometry(ctx, tgt, 4, 4, 4, 4)[0]
    torch.testing.assert_close(geo[0, 0, :2], torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(geo[3, 3, :2], torch.tensor([1.75, 1.75]))
    torch.testing.assert_close(geo[..., 2:4], torch.full((4, 4, 2), math.log(0.5)))
    # a target partly outside the context gets positions outside [0, w): still well defined
    out = relative_geometry(ctx, torch.tensor([[0.5, 0.0, 0.9, 0.4, 0.0]]), 4, 4, 4, 4)[0]
    assert out[..., 0].max() > 4 and out[..., 1].min() < 0


def test_same_scene_point_same_position():
    """A target token and the context position it maps to show the same point of the original image."""
    torch.manual_seed(0)
    for _ in range(20):
        lo = torch.rand(2, 2) * 0.5
        size = 0.2 + torch.rand(2, 2) * 0.5
        flips = (torch.rand(2) < 0.5).float()
        ctx = torch.cat([lo[0], lo[0] + size[0], flips[:1]])[None]
        tgt = torch.cat([lo[1], lo[1] + size[1], flips[1:]])[None]
        geo = relative_geometry(ctx, tgt, 5, 7, 3, 6)[0]  # different map sizes for context and target
        tx, ty = token_centres(tgt, 3, 6)
        # context pixel (u, v) in [0, 1] at the mapped position, back to original coordinates
        u, v = geo[..., 0] / 7, geo[..., 1] / 5
        u = 1 - u if flips[0] > 0.5 else u
        x = ctx[0, 0] + u * (ctx[0, 2] - ctx[0, 0])
        y = ctx[0, 1] + v * (ctx[0, 3] - ctx[0, 1])
        torch.testing.assert_close(x, tx[0])
        torch.testing.assert_close(y, ty[0])
