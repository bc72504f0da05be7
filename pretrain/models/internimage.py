"""InternImage (Wang et al., CVPR 2023): blocks -> stage -> model -> init -> lr-decay keywords -> variants.

State-dict keys and shapes equal the official classification model's for every option, so released
checkpoints load with `strict=True`, and the forward math is the official one (eval mode). Tensors are
channels-last (N, H, W, C) between the stem and the head.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence

import torch
import torch.utils.checkpoint as cp
from torch import nn

from .dcnv3 import DCNv3
from .heads import AttentionPoolingBlock
from .layers import (
    AlignedConv2d,
    DownsampleLayer,
    DropPath,
    MLPLayer,
    StemLayer,
    build_act_layer,
    build_norm_layer,
)

# Official `core_op` names; both have the same parameters, only the op implementation differs.
_CORE_OP_BACKENDS = {"DCNv3": "auto", "DCNv3_pytorch": "reference"}


class InternImageLayer(nn.Module):
    """One block: DCNv3 token mixer + MLP, in pre-norm (T), post-norm (S–XL, G), or res-post-norm (H) form.

    With `layer_scale` set the residual branches are scaled by gamma1/gamma2 and `res_post_norm` only adds
    (unused) parameters, exactly as in the official code.
    """

    def __init__(
        self,
        channels: int,
        groups: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        post_norm: bool = False,
        layer_scale: float | None = None,
        offset_scale: float = 1.0,
        with_cp: bool = False,
        dw_kernel_size: int | None = None,
        res_post_norm: bool = False,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        dcn_backend: str = "auto",
    ):
        super().__init__()
        self.with_cp = with_cp
        self.post_norm = post_norm
        self.res_post_norm = res_post_norm
        self.norm1 = build_norm_layer(channels, "LN")
        self.dcn = DCNv3(
            channels=channels,
            kernel_size=3,
            stride=1,
            pad=1,
            dilation=1,
            group=groups,
            offset_scale=offset_scale,
            act_layer=act_layer,
            norm_layer=norm_layer,
            dw_kernel_size=dw_kernel_size,
            center_feature_scale=center_feature_scale,
            remove_center=remove_center,
            backend=dcn_backend,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = build_norm_layer(channels, "LN")
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio), act_layer=act_layer, drop=drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((channels,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((channels,), float(layer_scale)))
        if res_post_norm:
            self.res_post_norm1 = build_norm_layer(channels, "LN")
            self.res_post_norm2 = build_norm_layer(channels, "LN")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        dp = self.drop_path
        if self.layer_scale:
            if self.post_norm:
                x = x + dp(self.gamma1 * self.norm1(self.dcn(x)))
                return x + dp(self.gamma2 * self.norm2(self.mlp(x)))
            x = x + dp(self.gamma1 * self.dcn(self.norm1(x)))
            return x + dp(self.gamma2 * self.mlp(self.norm2(x)))
        if self.post_norm:
            x = x + dp(self.norm1(self.dcn(x)))
            return x + dp(self.norm2(self.mlp(x)))
        if self.res_post_norm:
            x = x + dp(self.res_post_norm1(self.dcn(self.norm1(x))))
            return x + dp(self.res_post_norm2(self.mlp(self.norm2(x))))
        x = x + dp(self.dcn(self.norm1(x)))
        return x + dp(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            # Non-reentrant checkpointing recomputes with the saved RNG state: identical DropPath masks.
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class InternImageStage(nn.Module):
    """A stage (`levels.{i}` in the official keys): blocks, optional post-norms, norm, downsample."""

    def __init__(
        self,
        channels: int,
        depth: int,
        groups: int,
        downsample: bool,
        drop_path: Sequence[float],
        post_norm: bool,
        center_feature_scale: bool,
        post_norm_block_ids: Sequence[int] | None = None,
        norm_layer: str = "LN",
        **layer_kwargs,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            InternImageLayer(
                channels,
                groups,
                drop_path=drop_path[i],
                post_norm=post_norm,
                center_feature_scale=center_feature_scale,
                norm_layer=norm_layer,
                **layer_kwargs,
            )
            for i in range(depth)
        )
        # Official quirk: post-norm stages have no stage norm, except when center-feature-scale is on (G).
        self.has_norm = not post_norm or center_feature_scale
        if self.has_norm:
            self.norm = build_norm_layer(channels, "LN")
        self.post_norm_block_ids = list(post_norm_block_ids) if post_norm_block_ids is not None else None
        if self.post_norm_block_ids is not None:
            self.post_norms = nn.ModuleList(
                build_norm_layer(channels, "LN") for _ in self.post_norm_block_ids
            )
        self.downsample = DownsampleLayer(channels, norm_layer=norm_layer) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input of the next stage, this stage's output before downsampling)."""
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.post_norm_block_ids is not None and i in self.post_norm_block_ids:
                x = self.post_norms[self.post_norm_block_ids.index(i)](x)
        if self.has_norm:
            x = self.norm(x)
        out = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, out


class InternImage(nn.Module):
    """The InternImage backbone + classification head (official constructor keywords).

    `dcn_backend` ("auto" | "reference" | "cuda" | any registered backend) picks the DCNv3 implementation;
    the official `core_op` ("DCNv3" | "DCNv3_pytorch") is accepted for config compatibility.

    Outputs: `forward_features(x)` -> dict with `stages` (4 channels-last maps, before downsampling),
    `tokens16` (the stride-16 map: the H/G `dcnv3_head_x4 + dcnv3_head_x3` 1024-channel tokens, or stage 3
    for T–XL) and `pooled` (the official pre-head feature: conv_head+avgpool for T–XL, the 768-d
    CLIP-projector embedding for H/G); `forward_head(feats)` -> logits; `forward(x)` = both.
    """

    # H/G pretraining head sizes (official constants).
    PRETRAIN_EMBED_DIM = 1024
    CLIP_EMBED_DIM = 768
    ATTNPOOL_HEADS = 16

    def __init__(
        self,
        channels: int = 64,
        depths: Sequence[int] = (3, 4, 18, 5),
        groups: Sequence[int] = (3, 6, 12, 24),
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        drop_path_type: str = "linear",
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        layer_scale: float | None = None,
        offset_scale: float = 1.0,
        post_norm: bool = False,
        cls_scale: float = 1.5,
        with_cp: bool = False,
        dw_kernel_size: int | None = None,
        use_clip_projector: bool = False,
        level2_post_norm: bool = False,
        level2_post_norm_block_ids: Sequence[int] | None = None,
        res_post_norm: bool = False,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        dcn_backend: str | None = None,
        core_op: str = "DCNv3",
    ):
        super().__init__()
        if core_op not in _CORE_OP_BACKENDS:
            raise ValueError(f"core_op must be one of {sorted(_CORE_OP_BACKENDS)}, got {core_op!r}")
        if drop_path_type not in ("linear", "uniform"):
            raise ValueError(f"drop_path_type must be 'linear' or 'uniform', got {drop_path_type!r}")
        if len(depths) != len(groups):
            raise ValueError(f"depths {list(depths)} and groups {list(groups)} must have one entry per stage")
        self.config = {k: v for k, v in locals().items() if k in _constructor_keys()}
        self.config["depths"], self.config["groups"] = list(depths), list(groups)
        if level2_post_norm_block_ids is not None:
            self.config["level2_post_norm_block_ids"] = list(level2_post_norm_block_ids)
        dcn_backend = dcn_backend or _CORE_OP_BACKENDS[core_op]

        self.num_classes = num_classes
        self.depths = list(depths)
        self.num_levels = len(depths)
        self.channels = channels
        self.num_features = int(channels * 2 ** (self.num_levels - 1))
        self.use_clip_projector = use_clip_projector

        self.patch_embed = StemLayer(3, channels, act_layer=act_layer, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(p=drop_rate)
        # Computed on the CPU explicitly so that building under `torch.device("meta")` still works.
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        if drop_path_type == "uniform":
            dpr = [drop_path_rate] * len(dpr)

        self.levels = nn.ModuleList()
        for i in range(self.num_levels):
            start = sum(depths[:i])
            self.levels.append(
                InternImageStage(
                    channels=int(channels * 2**i),
                    depth=depths[i],
                    groups=groups[i],
                    downsample=i < self.num_levels - 1,
                    drop_path=dpr[start : start + depths[i]],
                    post_norm=post_norm,
                    center_feature_scale=center_feature_scale,
                    post_norm_block_ids=level2_post_norm_block_ids if level2_post_norm and i == 2 else None,
                    norm_layer=norm_layer,
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    act_layer=act_layer,
                    layer_scale=layer_scale,
                    offset_scale=offset_scale,
                    with_cp=with_cp,
                    dw_kernel_size=dw_kernel_size,
                    res_post_norm=res_post_norm,
                    remove_center=remove_center,
                    dcn_backend=dcn_backend,
                )
            )

        if not use_clip_projector:  # T/S/B/L/XL
            head_dim = int(self.num_features * cls_scale)
            self.conv_head = nn.Sequential(
                AlignedConv2d(self.num_features, head_dim, kernel_size=1, bias=False),
                build_norm_layer(head_dim, "BN", "channels_first", "channels_first"),
                build_act_layer(act_layer),
            )
            self.tokens16_dim = int(channels * 2 ** min(2, self.num_levels - 1))
        else:  # H/G
            embed, stride = self.PRETRAIN_EMBED_DIM, 2
            self.dcnv3_head_x4 = nn.Sequential(
                AlignedConv2d(self.num_features, embed * stride**2, kernel_size=1), nn.PixelShuffle(stride)
            )
            self.dcnv3_head_x3 = AlignedConv2d(self.num_features // 2, embed, kernel_size=1)
            self.clip_projector = AttentionPoolingBlock(
                embed,
                num_heads=self.ATTNPOOL_HEADS,
                qkv_bias=True,
                norm_layer=norm_layer,
                out_dim=self.CLIP_EMBED_DIM,
            )
            self.fc_norm = build_norm_layer(self.CLIP_EMBED_DIM, norm_layer)
            head_dim = self.CLIP_EMBED_DIM
            self.tokens16_dim = embed
        self.pooled_dim = head_dim
        self.head = nn.Linear(head_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.init_weights()

    # ----------------------------------------------------------------------------------------- init
    def init_weights(self) -> None:
        """Official init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorms; DCN's own reset."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, DCNv3):
                m.reset_parameters()

    # -------------------------------------------------------------------------------------- forward
    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> the 4 stage outputs, channels-last, strides 4/8/16/32."""
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for level in self.levels:
            x, out = level(x)
            outs.append(out)
        return outs

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        stages = self.forward_stages(x)
        if self.use_clip_projector:
            x4 = self.dcnv3_head_x4(stages[3].permute(0, 3, 1, 2))
            tokens = (x4 + self.dcnv3_head_x3(stages[2].permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
            pooled = self.pool_tokens(tokens)
        else:
            tokens = stages[min(2, len(stages) - 1)]
            pooled = torch.flatten(self.avgpool(self.conv_head(stages[-1].permute(0, 3, 1, 2))), 1)
        return {"stages": stages, "tokens16": tokens, "pooled": pooled}

    def pool_tokens(self, tokens16: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """H/G only: CLIP-projector embedding (N, 768) of tokens16 (N, h, w, 1024), optionally of the
        tokens where `token_mask` (N, h, w) is True (per-image embeddings of a mixed input)."""
        if not self.use_clip_projector:
            raise RuntimeError(
                "pool_tokens needs the CLIP-projector head (use_clip_projector=True, H/G variants)"
            )
        n, h, w, d = tokens16.shape
        flat_mask = token_mask.reshape(n, h * w) if token_mask is not None else None
        return self.fc_norm(self.clip_projector(tokens16.reshape(n, h * w, d), flat_mask))

    def forward_head(self, features: dict) -> torch.Tensor:
        return self.head(features["pooled"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_dcn_backend(self, backend: str) -> None:
        """Switch every DCNv3 module to another op backend (weights untouched)."""
        for m in self.modules():
            if isinstance(m, DCNv3):
                m.backend = backend
        self.config["dcn_backend"] = backend


def _constructor_keys() -> frozenset[str]:
    return frozenset(p for p in inspect.signature(InternImage.__init__).parameters if p != "self")


def check_model_kwargs(kwargs: dict) -> None:
    """Raise a TypeError naming unknown InternImage keywords and the closest valid one."""
    valid = _constructor_keys()
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"InternImage got an unknown option {key!r}{hint}")


# ------------------------------------------------------------------------- layer-wise lr decay
# Parameters whose names contain one of these substrings get the DCN lr multiplier (official optimizer).
DCN_LR_KEYWORDS = ("offset", "attention_weights", "center_feature_scale_proj", "alpha_beta")


def lr_decay_ratios(model: InternImage, decay: float) -> dict[str, float]:
    """Official `lr_decay_keywards`: an ordered keyword -> lr-ratio table, deepest block first.

    Blocks get decay**idx counting from the last block of the last stage (idx 0); the stem shares the
    first block's ratio, each stage's downsample and norm the next stage's first block's. Everything
    unmatched (heads, stage-3 post-norms, the last stage's norm) keeps ratio 1.
    """
    depths = model.depths
    ratios: dict[str, float] = {}
    idx = 0
    for level in reversed(range(len(depths))):
        for block in reversed(range(depths[level])):
            ratios[f"levels.{level}.blocks.{block}."] = decay**idx
            idx += 1
    ratios["patch_embed"] = ratios["levels.0.blocks.0."]
    for level in range(len(depths) - 1):
        ratios[f"levels.{level}.downsample"] = ratios[f"levels.{level + 1}.blocks.0."]
        ratios[f"levels.{level}.norm"] = ratios[f"levels.{level + 1}.blocks.0."]
    return ratios


def lr_scale(param_name: str, ratios: dict[str, float]) -> float:
    """The ratio of the first keyword contained in `param_name` (official substring matching), else 1."""
    for keyword, ratio in ratios.items():
        if keyword in param_name:
            return ratio
    return 1.0
