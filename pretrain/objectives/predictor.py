"""The light transformer predictor of the dense term (SiameseIM's decoder, adapted to mixed inputs).

Input: the projected online tokens of the mixed image (context) and one query per target token. Context
tokens get the sine-cosine embedding of their grid position plus a learned *source* embedding saying whether
the token shows image A or image B (our addition: with two images in one input the decoder must know which
regions belong to the image a target comes from). Queries are a learned mask token per target kind
(intra: A's same view, inter: B's other view) plus the embedding of the target token's geometry in the context
frame: sine-cosine of its (x, y) and a linear embedding of (log scale x, log scale y, relative flip).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.transformer import TransformerBlock
from .geometry import sincos_2d


class Predictor(nn.Module):
    """context (B, h, w, P) + context geometry/source, query geometry (B, th, tw, 5) -> predictions (B, th, tw, P)."""

    INTRA, INTER = 0, 1

    def __init__(self, dim: int, width: int = 512, depth: int = 4, heads: int = 16):
        super().__init__()
        if width % heads or width % 4:
            raise ValueError(f"decoder width {width} must be divisible by heads {heads} and by 4")
        self.width = width
        self.embed = nn.Linear(dim, width)
        self.source_embed = nn.Parameter(torch.zeros(2, width))  # 0: token shows A, 1: shows B
        self.mask_token = nn.Parameter(torch.zeros(2, width))  # 0: intra-view query, 1: inter-view query
        self.geo_embed = nn.Linear(3, width)  # (log sx, log sy, rel flip)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.source_embed, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def geometry_embedding(self, geo: torch.Tensor) -> torch.Tensor:
        """(..., 5) geometry -> (..., width)."""
        return sincos_2d(geo[..., :2], self.width).to(geo.dtype) + self.geo_embed(geo[..., 2:])

    def forward(
        self,
        context: torch.Tensor,
        context_geo: torch.Tensor,
        from_b: torch.Tensor,
        query_geo: torch.Tensor,
        kind: int,
    ) -> torch.Tensor:
        """context (B, h, w, P); context_geo (B, h, w, 5); from_b (B, h, w) bool; query_geo (B, th, tw, 5);
        kind: INTRA or INTER. Returns (B, th, tw, P)."""
        b, h, w, _ = context.shape
        _, th, tw, _ = query_geo.shape
        ctx = self.embed(context) + self.geometry_embedding(context_geo.to(context.dtype))
        ctx = ctx + self.source_embed[from_b.long()]
        qry = self.mask_token[kind] + self.geometry_embedding(query_geo.to(context.dtype))
        x = torch.cat([ctx.reshape(b, h * w, -1), qry.reshape(b, th * tw, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.norm(x[:, h * w :]))
        return out.reshape(b, th, tw, -1)
