"""The pre-LN transformer block shared by the text tower (causal) and the M3I predictor (bidirectional)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)); fused qkv projection, PyTorch's scaled-dot-product attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"transformer width {width} is not divisible by its {heads} heads")
        self.heads = heads
        self.causal = causal
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))
