"""The DCNv3 reference op against an independent, naive per-pixel implementation (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.ops import (
    BackendUnavailable,
    DCNGeometry,
    FusedParams,
    available_backends,
    dcnv3_core,
    dcnv3_core_reference,
    dcnv3_fused,
    dcnv3_fused_reference,
)


def naive_dcnv3(value, offset, mask, k, stride, pad, dilation, group, offset_scale, remove_center):
    """Loops over every output pixel, group, point and channel; written from the formula, not the op."""
    n, h, w, c = value.shape
    cg = c // group
    ho = (h + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1
    wo = (w + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1
    center = dilation * (k - 1) // 2
    points = [(i, j) for i in range(k) for j in range(k)]  # width tap i major
    if remove_center:
        points = [pt for pt in points if pt != ((k - 1) // 2, (k - 1) // 2)]
    out = torch.zeros(n, ho, wo, c, dtype=torch.float64)

    def pixel(b, y, x, ch):
        if 0 <= y < h and 0 <= x < w:
            return float(value[b, y, x, ch])
        return 0.0

    for b in range(n):
        for oy in range(ho):
            for ox in range(wo):
                for g in range(group):
                    for p, (i, j) in enumerate(points):
                        dx = float(offset[b, oy, ox, g * 2 * len(points) + 2 * p])
                        dy = float(offset[b, oy, ox, g * 2 * len(points) + 2 * p + 1])
                        m = float(mask[b, oy, ox, g * len(points) + p])
                        sx = ox * stride - pad + center + (i * dilation - center + dx) * offset_scale
                        sy = oy * stride - pad + center + (j * dilation - center + dy) * offset_scale
                        x0, y0 = math.floor(sx), math.floor(sy)
                        fx, fy = sx - x0, sy - y0
                        for ch in range(g * cg, (g + 1) * cg):
                            v = (
                                pixel(b, y0, x0, ch) * (1 - fx) * (1 - fy)
                                + pixel(b, y0, x0 + 1, ch) * fx * (1 - fy)
                                + pixel(b, y0 + 1, x0, ch) * (1 - fx) * fy
                                + pixel(b, y0 + 1, x0 + 1, ch) * fx * fy
                            )
                            out[b, oy, ox, ch] += m * v
    return out


def random_inputs(n, h, w, group, cg, geom, offset_std=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = geom.output_size(h, w)
    p = geom.points
    value = torch.randn(n, h, w, group * cg, generator=gen, dtype=torch.float64)
    offset = torch.randn(n, ho, wo, group * p * 2, generator=gen, dtype=torch.float64) * offset_std
    mask = torch.softmax(torch.randn(n, ho, wo, group, p, generator=gen, dtype=torch.float64), -1)
    return value, offset, mask.reshape(n, ho, wo, group * p)


CASES = [
    # k, stride, pad, dilation, group, cg, offset_scale, remove_center, H, W
    (3, 1, 1, 1, 2, 3, 1.0, False, 5, 6),
    (3, 2, 1, 1, 3, 2, 1.0, False, 7, 5),  # stride 2, odd sizes
    (3, 1, 2, 2, 2, 2, 1.0, False, 6, 6),  # dilation 2
    (3, 1, 0, 1, 1, 4, 1.0, False, 6, 7),  # pad 0
    (5, 1, 2, 1, 2, 2, 1.0, False, 6, 5),  # kernel 5
    (3, 1, 1, 1, 4, 2, 2.0, True, 5, 5),  # remove_center, offset_scale 2 (L/XL)
    (5, 2, 2, 1, 2, 2, 0.5, True, 7, 6),  # everything at once
]


@pytest.mark.parametrize("k,stride,pad,dilation,group,cg,alpha,remove_center,h,w", CASES)
def test_reference_matches_naive(k, stride, pad, dilation, group, cg, alpha, remove_center, h, w):
    geom = DCNGeometry.make(k, stride, pad, dilation, group, alpha, remove_center)
    # Offsets with std 3 leave the image often: the zero-padding path is exercised.
    value, offset, mask = random_inputs(2, h, w, group, cg, geom, offset_std=3.0)
    got = dcnv3_core_reference(value, offset, mask, geom)
    want = naive_dcnv3(value, offset, mask, k, stride, pad, dilation, group, alpha, remove_center)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_far_out_of_image_samples_are_zero():
    geom = DCNGeometry.make(3, 1, 1, 1, 1)
    value, _, mask = random_inputs(1, 4, 4, 1, 3, geom)
    offset = torch.full((1, 4, 4, 18), 100.0, dtype=torch.float64)
    assert torch.count_nonzero(dcnv3_core_reference(value, offset, mask, geom)) == 0


def test_zero_offsets_uniform_mask_is_a_box_filter():
    """With zero offsets the op is a fixed 3x3 conv: a cheap, independent sanity check via conv2d."""
    geom = DCNGeometry.make(3, 1, 1, 1, 1)
    value, _, _ = random_inputs(1, 5, 6, 1, 2, geom)
    offset = torch.zeros(1, 5, 6, 18, dtype=torch.float64)
    mask = torch.full((1, 5, 6, 9), 1 / 9, dtype=torch.float64)
    got = dcnv3_core_reference(value, offset, mask, geom)
    box = torch.full((2, 1, 3, 3), 1 / 9, dtype=torch.float64)
    want = torch.nn.functional.conv2d(value.permute(0, 3, 1, 2), box, padding=1, groups=2).permute(0, 2, 3, 1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("remove_center,stride", [(False, 1), (True, 2)])
def test_gradcheck(remove_center, stride):
    geom = DCNGeometry.make(3, stride, 1, 1, 2, 1.5, remove_center)
    value, offset, mask = random_inputs(1, 4, 5, 2, 2, geom, offset_std=0.7, seed=3)
    # Keep sampling points away from integer coordinates, where bilinear interpolation has kinks.
    offset = offset + 0.237
    inputs = [t.clone().requires_grad_() for t in (value, offset, mask)]
    assert torch.autograd.gradcheck(
        lambda v, o, m: dcnv3_core_reference(v, o, m, geom), inputs, eps=1e-6, atol=1e-5
    )


def test_fused_reference_equals_composition():
    geom = DCNGeometry.make(3, 1, 1, 1, 2, 1.0, False)
    n, h, w, c = 2, 5, 4, 8
    gen = torch.Generator().manual_seed(1)
    value = torch.randn(n, h, w, c, dtype=torch.float64, generator=gen)
    x1 = torch.randn(n, h, w, c, dtype=torch.float64, generator=gen)

    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen) * 0.3

    params = FusedParams(rnd(36, c), rnd(36), rnd(18, c), rnd(18), rnd(c, c), rnd(c), rnd(2, c), rnd(2))
    out = dcnv3_fused(value, x1, params, geom)
    offset = x1 @ params.offset_weight.T + params.offset_bias
    mask = torch.softmax((x1 @ params.mask_weight.T + params.mask_bias).view(n, h, w, 2, 9), -1).view(
        n, h, w, 18
    )
    y = naive_dcnv3(value, offset, mask, 3, 1, 1, 1, 2, 1.0, False)
    s = torch.sigmoid(x1 @ params.cfs_weight.T + params.cfs_bias)  # (n, h, w, 2), 4 channels per group
    s = s[..., [0, 0, 0, 0, 1, 1, 1, 1]]
    y = y * (1 - s) + value * s
    torch.testing.assert_close(out, y @ params.output_weight.T + params.output_bias, rtol=1e-10, atol=1e-10)


def test_reference_runs_in_bf16_autocast():
    geom = DCNGeometry.make(3, 1, 1, 1, 2)
    value, offset, mask = (t.float() for t in random_inputs(1, 4, 4, 2, 4, geom))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcnv3_core(value.bfloat16(), offset, mask, geom)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_geometry_errors_name_the_tensor():
    geom = DCNGeometry.make(3, 1, 1, 1, 2)
    value, offset, mask = random_inputs(1, 4, 4, 2, 2, geom)
    with pytest.raises(ValueError, match="offset has shape"):
        dcnv3_core_reference(value, offset[..., :-1], mask, geom)
    with pytest.raises(ValueError, match="odd kernel"):
        DCNGeometry.make(kernel_size=4)


def test_dispatch_errors_are_one_line():
    geom = DCNGeometry.make(3, 1, 1, 1, 1)
    value, offset, mask = random_inputs(1, 3, 3, 1, 2, geom)
    assert "reference" in available_backends()
    with pytest.raises(BackendUnavailable) as err:
        dcnv3_core(value, offset, mask, geom, backend="no_such_backend")
    assert "\n" not in str(err.value) and "choose one of" in str(err.value)
    if "cuda" in available_backends(value):  # pragma: no cover - only with a built extension on CPU tensors
        pytest.fail("the CUDA backend must not claim CPU tensors")


def test_fused_reference_wrapper_matches_module_path():
    """`dcnv3_fused_reference` is what backend='reference' runs for the whole block."""
    geom = DCNGeometry.make(3, 1, 1, 1, 1)
    gen = torch.Generator().manual_seed(2)
    value = torch.randn(1, 3, 3, 2, dtype=torch.float64, generator=gen)
    x1 = torch.randn(1, 3, 3, 2, dtype=torch.float64, generator=gen)
    p = FusedParams(
        *(
            torch.randn(*s, dtype=torch.float64, generator=gen)
            for s in [(18, 2), (18,), (9, 2), (9,), (2, 2), (2,)]
        )
    )
    torch.testing.assert_close(
        dcnv3_fused(value, x1, p, geom, backend="reference"), dcnv3_fused_reference(value, x1, p, geom)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reference_is_finite_in_16_bit_with_one_image(dtype):
    """With N = 1 the sampled planes are a strided view, where torch's CPU grid_sample returned NaN for
    16-bit inputs (19,831 NaNs on a B-stage-1 shape): the oracle itself must not produce NaN."""
    gen = torch.Generator().manual_seed(0)
    geom = DCNGeometry.make(3, 1, 1, 1, group=4)  # NaN from 28x28 up (none at 20x20)
    value = torch.randn(1, 28, 28, 64, generator=gen)
    offset = torch.randn(1, 28, 28, 4 * 18, generator=gen)
    mask = torch.softmax(torch.randn(1, 28, 28, 4, 9, generator=gen), -1).flatten(3)
    out = dcnv3_core_reference(value.to(dtype), offset.to(dtype), mask.to(dtype), geom)
    assert torch.isfinite(out).all()
    exact = dcnv3_core_reference(*(t.to(dtype).double() for t in (value, offset, mask)), geom)
    # Coarse: in bf16 the oracle quantises sampling coordinates too (1/8 px at x ~ 28); the point is no NaN.
    assert ((out.double() - exact).norm() / exact.norm()).item() < 0.1
