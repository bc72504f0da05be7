"""InternImage: official key scheme, exact parameter counts, forward equality with an independent
functional implementation of the official model, gradients, with_cp and autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models import InternImage, create_model, list_models, lr_decay_ratios, lr_scale, variant_config

OFFICIAL_PARAMS = {
    "internimage_t": 29_918_424,
    "internimage_s": 50_079_880,
    "internimage_b": 97_461_832,
    "internimage_l": 223_334_810,
    "internimage_xl": 334_819_780,
    "internimage_h": 1_089_636_760,
    "internimage_g": 3_076_373_352,
}

# Tiny models of each official style.
STYLES = {
    "t_like": dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_classes=10),
    "s_xl_like": dict(
        channels=16,
        depths=[1, 1, 2, 1],
        groups=[2, 2, 4, 8],
        num_classes=10,
        layer_scale=0.5,
        post_norm=True,
        offset_scale=2.0,
    ),
    "h_like": dict(
        channels=16,
        depths=[1, 1, 3, 1],
        groups=[1, 2, 4, 8],
        num_classes=7,
        dw_kernel_size=5,
        res_post_norm=True,
        level2_post_norm=True,
        level2_post_norm_block_ids=[0, 2],
        center_feature_scale=True,
        use_clip_projector=True,
        remove_center=True,
    ),
    "g_like": dict(
        channels=16,
        depths=[1, 1, 2, 1],
        groups=[2, 4, 4, 8],
        num_classes=5,
        post_norm=True,
        dw_kernel_size=5,
        level2_post_norm=True,
        level2_post_norm_block_ids=[1],
        center_feature_scale=True,
        use_clip_projector=True,
    ),
}


# --------------------------------------------------------------- the official key scheme, from its rules
def official_shapes(cfg: dict) -> dict[str, tuple]:
    c, depths, groups = cfg["channels"], cfg["depths"], cfg["groups"]
    ratio = cfg.get("mlp_ratio", 4.0)
    dw = cfg.get("dw_kernel_size") or 3
    cfs, post_norm = cfg.get("center_feature_scale", False), cfg.get("post_norm", False)
    points = 9 - int(cfg.get("remove_center", False))
    shapes: dict[str, tuple] = {}

    def ln(name, dim):
        shapes[f"{name}.weight"] = (dim,)
        shapes[f"{name}.bias"] = (dim,)

    shapes["patch_embed.conv1.weight"], shapes["patch_embed.conv1.bias"] = (c // 2, 3, 3, 3), (c // 2,)
    ln("patch_embed.norm1.1", c // 2)
    shapes["patch_embed.conv2.weight"], shapes["patch_embed.conv2.bias"] = (c, c // 2, 3, 3), (c,)
    ln("patch_embed.norm2.1", c)
    for i, (depth, g) in enumerate(zip(depths, groups)):
        ci = c * 2**i
        for j in range(depth):
            b = f"levels.{i}.blocks.{j}."
            ln(b + "norm1.0", ci)
            shapes[b + "dcn.dw_conv.0.weight"], shapes[b + "dcn.dw_conv.0.bias"] = (ci, 1, dw, dw), (ci,)
            ln(b + "dcn.dw_conv.1.1", ci)
            for name, out in (
                ("offset", g * points * 2),
                ("mask", g * points),
                ("input_proj", ci),
                ("output_proj", ci),
            ):
                shapes[b + f"dcn.{name}.weight"], shapes[b + f"dcn.{name}.bias"] = (out, ci), (out,)
            if cfs:
                shapes[b + "dcn.center_feature_scale_proj_weight"] = (g, ci)
                shapes[b + "dcn.center_feature_scale_proj_bias"] = (g,)
            ln(b + "norm2.0", ci)
            hid = int(ci * ratio)
            shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (hid, ci), (hid,)
            shapes[b + "mlp.fc2.weight"], shapes[b + "mlp.fc2.bias"] = (ci, hid), (ci,)
            if cfg.get("layer_scale") is not None:
                shapes[b + "gamma1"], shapes[b + "gamma2"] = (ci,), (ci,)
            if cfg.get("res_post_norm", False):
                ln(b + "res_post_norm1.0", ci)
                ln(b + "res_post_norm2.0", ci)
        if not post_norm or cfs:
            ln(f"levels.{i}.norm.0", ci)
        if cfg.get("level2_post_norm", False) and i == 2:
            for t in range(len(cfg["level2_post_norm_block_ids"])):
                ln(f"levels.2.post_norms.{t}.0", ci)
        if i < len(depths) - 1:
            shapes[f"levels.{i}.downsample.conv.weight"] = (2 * ci, ci, 3, 3)
            ln(f"levels.{i}.downsample.norm.1", 2 * ci)
    nf = c * 2 ** (len(depths) - 1)
    ncls = cfg.get("num_classes", 1000)
    if not cfg.get("use_clip_projector", False):
        hd = int(nf * cfg.get("cls_scale", 1.5))
        shapes["conv_head.0.weight"] = (hd, nf, 1, 1)
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"conv_head.1.0.{s}"] = (hd,)
        shapes["conv_head.1.0.num_batches_tracked"] = ()
    else:
        hd = 768
        shapes["dcnv3_head_x4.0.weight"], shapes["dcnv3_head_x4.0.bias"] = (4096, nf, 1, 1), (4096,)
        shapes["dcnv3_head_x3.weight"], shapes["dcnv3_head_x3.bias"] = (1024, nf // 2, 1, 1), (1024,)
        for n in ("q", "k", "v"):
            ln(f"clip_projector.norm1_{n}.0", 1024)
            shapes[f"clip_projector.cross_dcn.{n}.weight"] = (1024, 1024)
            shapes[f"clip_projector.cross_dcn.{n}_bias"] = (1024,)
        shapes["clip_projector.cross_dcn.proj.weight"], shapes["clip_projector.cross_dcn.proj.bias"] = (
            (768, 1024),
            (768,),
        )
        ln("fc_norm.0", 768)
    if ncls > 0:
        shapes["head.weight"], shapes["head.bias"] = (ncls, hd), (ncls,)
    return shapes


def state_shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_variant_keys_shapes_and_param_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]
    assert state_shapes(model) == official_shapes(variant_config(name))


@pytest.mark.parametrize("name", ["internimage_l", "internimage_h"])
def test_22k_head_builds(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=21841)
    assert model.head.weight.shape[0] == 21841


@pytest.mark.parametrize("style", list(STYLES))
def test_style_keys(style):
    assert state_shapes(InternImage(**STYLES[style])) == official_shapes(STYLES[style])


def test_registry_and_option_errors():
    assert list_models() == list(OFFICIAL_PARAMS)
    with pytest.raises(KeyError, match="did you mean 'internimage_t'"):
        create_model("internimage_tt")
    with pytest.raises(TypeError, match="did you mean 'drop_path_rate'"):
        create_model("internimage_t", drop_path_rat=0.1)


# ----------------------------------------------- an independent functional forward of the official model
def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _dcn(x, sd, b, cfg, group):
    from pretrain.ops import DCNGeometry, dcnv3_core_reference

    n, h, w, c = x.shape
    dw = sd[b + "dw_conv.0.weight"]
    x_proj = _lin(x, sd, b + "input_proj")
    x1 = F.conv2d(
        x.permute(0, 3, 1, 2), dw, sd[b + "dw_conv.0.bias"], padding=(dw.shape[-1] - 1) // 2, groups=c
    )
    x1 = F.gelu(_ln(x1.permute(0, 2, 3, 1), sd, b + "dw_conv.1.1"))
    offset = _lin(x1, sd, b + "offset")
    mask = F.softmax(_lin(x1, sd, b + "mask").view(n, h, w, group, -1), -1).view(n, h, w, -1)
    geom = DCNGeometry.make(3, 1, 1, 1, group, cfg.get("offset_scale", 1.0), cfg.get("remove_center", False))
    y = dcnv3_core_reference(x_proj, offset, mask, geom)
    if cfg.get("center_feature_scale", False):
        s = torch.sigmoid(
            F.linear(x1, sd[b + "center_feature_scale_proj_weight"], sd[b + "center_feature_scale_proj_bias"])
        )
        s = s[..., None].repeat(1, 1, 1, 1, c // group).flatten(-2)
        y = y * (1 - s) + x_proj * s
    return _lin(y, sd, b + "output_proj")


def official_forward(sd: dict, cfg: dict, img: torch.Tensor) -> torch.Tensor:
    def mlp(x, b):
        return _lin(F.gelu(_lin(x, sd, b + "fc1")), sd, b + "fc2")

    x = F.conv2d(img, sd["patch_embed.conv1.weight"], sd["patch_embed.conv1.bias"], stride=2, padding=1)
    x = F.gelu(_ln(x.permute(0, 2, 3, 1), sd, "patch_embed.norm1.1").permute(0, 3, 1, 2))
    x = F.conv2d(x, sd["patch_embed.conv2.weight"], sd["patch_embed.conv2.bias"], stride=2, padding=1)
    x = _ln(x.permute(0, 2, 3, 1), sd, "patch_embed.norm2.1")
    cfs, post = cfg.get("center_feature_scale", False), cfg.get("post_norm", False)
    outs = []
    for i, depth in enumerate(cfg["depths"]):
        for j in range(depth):
            b = f"levels.{i}.blocks.{j}."

            def dcn(t, b=b, group=cfg["groups"][i]):
                return _dcn(t, sd, b + "dcn.", cfg, group)

            if cfg.get("layer_scale") is not None:
                g1, g2 = sd[b + "gamma1"], sd[b + "gamma2"]
                if post:
                    x = x + g1 * _ln(dcn(x), sd, b + "norm1.0")
                    x = x + g2 * _ln(mlp(x, b + "mlp."), sd, b + "norm2.0")
                else:
                    x = x + g1 * dcn(_ln(x, sd, b + "norm1.0"))
                    x = x + g2 * mlp(_ln(x, sd, b + "norm2.0"), b + "mlp.")
            elif post:
                x = x + _ln(dcn(x), sd, b + "norm1.0")
                x = x + _ln(mlp(x, b + "mlp."), sd, b + "norm2.0")
            elif cfg.get("res_post_norm", False):
                x = x + _ln(dcn(_ln(x, sd, b + "norm1.0")), sd, b + "res_post_norm1.0")
                x = x + _ln(mlp(_ln(x, sd, b + "norm2.0"), b + "mlp."), sd, b + "res_post_norm2.0")
            else:
                x = x + dcn(_ln(x, sd, b + "norm1.0"))
                x = x + mlp(_ln(x, sd, b + "norm2.0"), b + "mlp.")
            ids = cfg.get("level2_post_norm_block_ids") if cfg.get("level2_post_norm") and i == 2 else None
            if ids is not None and j in ids:
                x = _ln(x, sd, f"levels.2.post_norms.{ids.index(j)}.0")
        if not post or cfs:
            x = _ln(x, sd, f"levels.{i}.norm.0")
        outs.append(x)
        if i < len(cfg["depths"]) - 1:
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[f"levels.{i}.downsample.conv.weight"], stride=2, padding=1)
            x = _ln(x.permute(0, 2, 3, 1), sd, f"levels.{i}.downsample.norm.1")
    if not cfg.get("use_clip_projector", False):
        x = F.conv2d(x.permute(0, 3, 1, 2), sd["conv_head.0.weight"])
        x = F.batch_norm(
            x,
            sd["conv_head.1.0.running_mean"],
            sd["conv_head.1.0.running_var"],
            sd["conv_head.1.0.weight"],
            sd["conv_head.1.0.bias"],
            training=False,
            eps=1e-5,
        )
        x = F.gelu(x).mean((2, 3))
    else:
        x4 = F.pixel_shuffle(
            F.conv2d(outs[3].permute(0, 3, 1, 2), sd["dcnv3_head_x4.0.weight"], sd["dcnv3_head_x4.0.bias"]), 2
        )
        x = x4 + F.conv2d(outs[2].permute(0, 3, 1, 2), sd["dcnv3_head_x3.weight"], sd["dcnv3_head_x3.bias"])
        x = x.flatten(2).transpose(1, 2)  # (B, N, 1024)
        p = "clip_projector."
        q = _ln(x.mean(1, keepdim=True), sd, p + "norm1_q.0")
        k, v = _ln(x, sd, p + "norm1_k.0"), _ln(x, sd, p + "norm1_v.0")
        bsz, heads = x.shape[0], 16

        def split(t, n):
            return (
                F.linear(t, sd[p + f"cross_dcn.{n}.weight"], sd[p + f"cross_dcn.{n}_bias"])
                .view(bsz, t.shape[1], heads, -1)
                .transpose(1, 2)
            )

        qh, kh, vh = split(q, "q") * (1024 // heads) ** -0.5, split(k, "k"), split(v, "v")
        a = (qh @ kh.transpose(-2, -1)).softmax(-1) @ vh
        x = _lin(a.transpose(1, 2).reshape(bsz, 1, 1024), sd, p + "cross_dcn.proj").squeeze(1)
        x = _ln(x, sd, "fc_norm.0")
    return _lin(x, sd, "head")


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (also offsets/masks/center-feature-scale, zero at init) so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "offset" in name or "mask" in name else 0.2
            p.copy_(
                torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
                + (1.0 if name.endswith("norm.0.weight") else 0.0)
            )
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen, dtype=buf.dtype) + 0.5)
            elif name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen, dtype=buf.dtype) * 0.1)
    return model


@pytest.mark.parametrize("style", list(STYLES))
def test_forward_equals_official_functional(style):
    cfg = STYLES[style]
    model = randomized(InternImage(**cfg).double().eval())
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    got = model(img)
    want = official_forward(model.state_dict(), cfg, img)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("style", list(STYLES))
def test_features_and_backward(style):
    model = randomized(InternImage(**STYLES[style], drop_path_rate=0.1)).train()
    feats = model.forward_features(torch.randn(2, 3, 64, 64))
    assert [s.shape[1:3] for s in feats["stages"]] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert feats["tokens16"].shape == (2, 4, 4, model.tokens16_dim)
    assert feats["pooled"].shape == (2, model.pooled_dim)
    model.forward_head(feats).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_pool_tokens_mask_all_true_is_official_pooling():
    model = randomized(InternImage(**STYLES["h_like"]).double().eval())
    tokens = model.forward_features(torch.randn(2, 3, 64, 64, dtype=torch.float64))["tokens16"]
    full = model.pool_tokens(tokens)
    torch.testing.assert_close(
        model.pool_tokens(tokens, torch.ones(tokens.shape[:3], dtype=torch.bool)), full
    )
    half = torch.zeros(tokens.shape[:3], dtype=torch.bool)
    half[:, :, :2] = True
    torch.testing.assert_close(
        model.pool_tokens(tokens, half), model.pool_tokens(tokens[:, :, :2].contiguous())
    )


@pytest.mark.parametrize("style", ["t_like", "h_like"])
def test_with_cp_gives_identical_gradients(style):
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = randomized(InternImage(**STYLES[style], with_cp=with_cp, drop_path_rate=0.2).double()).train()
        torch.manual_seed(1)
        model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_bf16_autocast_forward_backward():
    model = InternImage(**STYLES["h_like"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_official_init():
    model = InternImage(**STYLES["h_like"])
    dcn = model.levels[0].blocks[0].dcn
    assert torch.count_nonzero(dcn.offset.weight) == 0 and torch.count_nonzero(dcn.mask.bias) == 0
    assert torch.count_nonzero(dcn.center_feature_scale_proj_weight) == 0
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_lr_decay_keywords_official_semantics():
    model = InternImage(channels=16, depths=[2, 2, 2, 2], groups=[1, 2, 4, 8], num_classes=3)
    r = lr_decay_ratios(model, 0.5)
    assert r["levels.3.blocks.1."] == 1.0 and r["levels.3.blocks.0."] == 0.5
    assert r["levels.0.blocks.0."] == 0.5**7 == r["patch_embed"]
    assert r["levels.1.downsample"] == r["levels.2.blocks.0."] == r["levels.1.norm"]
    assert lr_scale("backbone.levels.0.blocks.1.dcn.offset.weight", r) == 0.5**6
    assert lr_scale("levels.2.post_norms.0.0.weight", r) == 1.0
    assert lr_scale("head.weight", r) == 1.0
    # every named parameter resolves, and none matches a wrong block (e.g. "blocks.1." vs "blocks.11.")
    assert all(0 < lr_scale(n, r) <= 1 for n, _ in model.named_parameters())
