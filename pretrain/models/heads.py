"""The InternImage-H/G CLIP-projector head: attention pooling of the stride-16 token map to 768-d.

The query is the mean token; keys/values are all tokens (official `AttentionPoolingBlock`). An optional
`token_mask` restricts both the mean and the attention to a subset of tokens, which the M3I objective
uses to embed each image of a mixed input separately; with no mask the math is the official one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import build_norm_layer


class CrossAttention(nn.Module):
    """Multi-head cross attention with optional shared-bias q/k/v (official `CrossAttention` keys)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, out_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.k_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.proj = nn.Linear(dim, out_dim or dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q (B, Nq, D), k/v (B, Nk, D), key_mask (B, Nk) bool (True = attend) -> (B, Nq, out_dim)."""
        b, nq, d = q.shape
        h = self.num_heads

        def heads(x, weight, bias):
            return F.linear(x, weight, bias).view(b, x.shape[1], h, d // h).transpose(1, 2)

        qh = heads(q, self.q.weight, self.q_bias) * self.scale
        kh = heads(k, self.k.weight, self.k_bias)
        vh = heads(v, self.v.weight, self.v_bias)
        attn = qh @ kh.transpose(-2, -1)  # (B, H, Nq, Nk)
        if key_mask is not None:
            attn = attn.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = (attn.softmax(dim=-1) @ vh).transpose(1, 2).reshape(b, nq, d)
        return self.proj(out)


class AttentionPoolingBlock(nn.Module):
    """LN-normalised attention pooling: (B, N, D) tokens -> (B, out_dim)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        norm_layer: str = "LN",
        out_dim: int | None = None,
    ):
        super().__init__()
        self.norm1_q = build_norm_layer(dim, norm_layer)
        self.norm1_k = build_norm_layer(dim, norm_layer)
        self.norm1_v = build_norm_layer(dim, norm_layer)
        self.cross_dcn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, out_dim=out_dim)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D); token_mask (B, N) bool selects the tokens to pool (every row needs one True)."""
        if token_mask is None:
            query = x.mean(1, keepdim=True)
        else:
            weights = token_mask.to(x.dtype).unsqueeze(-1)
            query = (x * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1.0)
        out = self.cross_dcn(self.norm1_q(query), self.norm1_k(x), self.norm1_v(x), key_mask=token_mask)
        return out.squeeze(1)
