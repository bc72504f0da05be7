"""CLIP-style text transformer: token + learned position embeddings, causal pre-LN blocks, end-token pooling."""

from __future__ import annotations

import torch
from torch import nn

from ..models.transformer import TransformerBlock


class TextTransformer(nn.Module):
    """ids (B, L) long + end positions (B,) -> text embeddings (B, embed_dim) (not normalised).

    The feature at the end token after the final LayerNorm is projected (no bias) to the joint space, as
    in CLIP. Init: trunc-normal 0.02 for linears and token embeddings, 0.01 for positions, zero biases.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        context_length: int = 77,
        width: int = 512,
        depth: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList(
            # Causal: each token sees only its prefix, so padding after the end token never leaks into it.
            TransformerBlock(width, heads, mlp_ratio, causal=True)
            for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.token_embedding.weight, std=0.02)
        nn.init.trunc_normal_(self.positional_embedding, std=0.01)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), end_index]
        return self.text_projection(pooled)
