"""GPU validation of the fused DCNv3 kernels (marker `gpu`; skipped without CUDA or without the built extension).

Build first on the GPU machine: `python -m pretrain.ops.build` (see README). Every check compares against the
pure-PyTorch reference in float64 on fresh random inputs, using the flash-attention rule for low precision:
the kernel's max error is at most 2x the error of the same reference evaluated in that precision (plus a
small floor relative to the output's magnitude, for outputs the reference happens to get nearly exact).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from pretrain.ops import DCNGeometry, FusedParams, cuda, dcnv3_core_reference, dcnv3_fused_reference, dispatch

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}  # x max|reference|

# (name, N, H, W, C, group, offset_scale, center_feature_scale, remove_center) at 224 px unless noted.
SHAPES = [
    ("T-stage1", 2, 56, 56, 64, 4, 1.0, False, False),  # Cg 16
    ("T-stage4", 2, 7, 7, 512, 32, 1.0, False, False),
    ("B-stage1-odd-groups", 1, 56, 56, 112, 7, 1.0, False, False),  # G = 7: a CTA with one live group
    ("B-stage3", 2, 14, 14, 448, 28, 1.0, False, False),
    ("H-stage1", 1, 56, 56, 320, 10, 1.0, True, False),  # Cg 32, center-feature-scale
    ("H-stage4", 2, 7, 7, 2560, 80, 1.0, True, False),
    ("L-like-scale2", 2, 28, 28, 160, 10, 2.0, False, False),
    ("odd-HW-remove-center", 3, 13, 9, 64, 2, 1.0, True, True),  # Cg 32, P = 8
    ("batch1-tiny", 1, 1, 3, 32, 2, 1.0, True, False),
]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = cuda.unavailable_reason(torch.empty(1, device="cuda"))
    if reason:
        pytest.skip(reason)


def make_inputs(n, h, w, c, group, offset_scale, cfs, remove_center, seed, dtype=torch.float64):
    """Fresh random block inputs; offsets ~ a few pixels so sampling crosses tiles and image borders."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    geom = DCNGeometry.make(3, 1, 1, 1, group=group, offset_scale=offset_scale, remove_center=remove_center)
    g, p = group, geom.points

    def r(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64) * std).to(dtype)

    params = FusedParams(
        r(g * p * 2, c, std=2.0 / c**0.5),
        r(g * p * 2, std=0.5),
        r(g * p, c, std=1.0 / c**0.5),
        r(g * p, std=0.5),
        r(c, c, std=1.0 / c**0.5),
        r(c, std=0.1),
        r(g, c, std=1.0 / c**0.5) if cfs else None,
        r(g, std=0.5) if cfs else None,
    )
    return r(n, h, w, c), r(n, h, w, c), params, geom


def cast(value, x1, params, dtype):
    p = FusedParams(
        *(None if t is None else t.detach().to(dtype).requires_grad_() for t in vars(params).values())
    )
    return value.detach().to(dtype).requires_grad_(), x1.detach().to(dtype).requires_grad_(), p


def leaves(value, x1, params):
    return [value, x1, *(t for t in vars(params).values() if t is not None)]


def run_block(fn, value, x1, params, geom, grad_out):
    out = fn(value, x1, params, geom)
    grads = torch.autograd.grad(out, leaves(value, x1, params), grad_out.to(out.dtype))
    return [out.detach(), *grads]


NAMES = ["out", "value", "x1", "offset_w", "offset_b", "mask_w", "mask_b", "out_w", "out_b", "cfs_w", "cfs_b"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_fused_forward_and_every_gradient(shape, dtype):
    _, n, h, w, c, group, alpha, cfs, rc = shape
    value, x1, params, geom = make_inputs(
        n, h, w, c, group, alpha, cfs, rc, seed=zlib.crc32(shape[0].encode())
    )
    grad_out = torch.randn(n, h, w, c, device="cuda", dtype=torch.float64)
    exact = run_block(dcnv3_fused_reference, *cast(value, x1, params, torch.float64), geom, grad_out)
    lowp_ref = run_block(dcnv3_fused_reference, *cast(value, x1, params, dtype), geom, grad_out)
    kernel = run_block(cuda.dcnv3_fused_cuda, *cast(value, x1, params, dtype), geom, grad_out)
    for name, e, r, k in zip(NAMES, exact, lowp_ref, kernel):
        assert k.dtype == dtype and k.shape == e.shape, name
        assert torch.isfinite(k).all(), f"{name}: non-finite values"
        err_k = (k.double() - e).abs().max().item()
        err_r = (r.double() - e).abs().max().item()
        floor = FLOOR[dtype] * max(e.abs().max().item(), 1e-6)
        assert err_k <= 2 * err_r + floor, (
            f"{name}: kernel error {err_k:.3g} > 2 x reference error {err_r:.3g} + {floor:.3g}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_core_forward_and_gradients(dtype, stride):
    geom = DCNGeometry.make(3, stride, 1, 1, group=4, offset_scale=1.0)
    n, h, w, c = 2, 17, 23, 64
    ho, wo = geom.output_size(h, w)
    gen = torch.Generator(device="cuda").manual_seed(7 + stride)
    value = torch.randn(n, h, w, c, device="cuda", dtype=torch.float64, generator=gen)
    offset = torch.randn(n, ho, wo, 4 * 2 * 9, device="cuda", dtype=torch.float64, generator=gen) * 2
    mask = torch.softmax(
        torch.randn(n, ho, wo, 4, 9, device="cuda", dtype=torch.float64, generator=gen), -1
    ).flatten(3)
    grad = torch.randn(n, ho, wo, c, device="cuda", dtype=torch.float64, generator=gen)

    def run(fn, dt):
        ins = [t.to(dt).requires_grad_() for t in (value, offset, mask)]
        out = fn(*ins, geom)
        return [out.detach(), *torch.autograd.grad(out, ins, grad.to(dt))]

    exact, lowp, kernel = (
        run(dcnv3_core_reference, torch.float64),
        run(dcnv3_core_reference, dtype),
        run(cuda.dcnv3_core_cuda, dtype),
    )
    for name, e, r, k in zip(["out", "value", "offset", "mask"], exact, lowp, kernel):
        err_k, err_r = (k.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        floor = FLOOR[dtype] * max(e.abs().max().item(), 1e-6)
        assert err_k <= 2 * err_r + floor, f"{name}: {err_k:.3g} vs reference {err_r:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_batch(dtype):
    """T stage 1 at batch 64: grid sizes and 64-bit offsets in the big-tensor regime (vs the reference in dtype)."""
    value, x1, params, geom = make_inputs(64, 56, 56, 64, 4, 1.0, False, False, seed=3, dtype=dtype)
    value, x1, params = cast(value, x1, params, dtype)
    grad_out = torch.randn_like(value)
    ref = run_block(dcnv3_fused_reference, value, x1, params, geom, grad_out)
    ker = run_block(cuda.dcnv3_fused_cuda, value, x1, params, geom, grad_out)
    for name, r, k in zip(NAMES, ref, ker):
        rel = (k.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)
        assert rel < (2e-2 if dtype == torch.bfloat16 else 1e-4), f"{name}: relative error {rel:.3g}"


def test_poisoned_memory_is_fully_overwritten():
    """Fill the caching allocator with NaN, free it, then run: every output and gradient must be finite."""
    value, x1, params, geom = make_inputs(3, 13, 9, 64, 2, 1.0, True, False, seed=11, dtype=torch.bfloat16)
    value, x1, params = cast(value, x1, params, torch.bfloat16)
    torch.cuda.synchronize()
    poison = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]
    del poison
    results = run_block(cuda.dcnv3_fused_cuda, value, x1, params, geom, torch.randn_like(value))
    for name, t in zip(NAMES, results):
        assert torch.isfinite(t).all(), f"{name} kept poisoned memory"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_runs_agree_bitwise(dtype):
    """Deterministic backward: no float atomics (fixed-point grad_value, fixed-order split-K reductions)."""
    value, x1, params, geom = make_inputs(4, 28, 28, 320, 10, 1.0, True, False, seed=5)
    value, x1, params = cast(value, x1, params, dtype)
    grad_out = torch.randn_like(value)
    first = run_block(cuda.dcnv3_fused_cuda, value, x1, params, geom, grad_out)
    for _ in range(3):
        again = run_block(cuda.dcnv3_fused_cuda, value, x1, params, geom, grad_out)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between runs"


def test_nonfinite_grad_propagates():
    """A NaN in the incoming gradient must reach grad(value) (loss-scaling overflow checks rely on it)."""
    value, x1, params, geom = make_inputs(1, 7, 7, 64, 4, 1.0, False, False, seed=2, dtype=torch.float16)
    value, x1, params = cast(value, x1, params, torch.float16)
    grad_out = torch.randn_like(value)
    grad_out[0, 3, 3, 5] = float("nan")
    grads = run_block(cuda.dcnv3_fused_cuda, value, x1, params, geom, grad_out)
    assert torch.isnan(grads[1]).any()


def test_auto_dispatch_picks_the_built_kernel():
    t = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    assert dispatch.resolve("auto", t, "fused") is cuda.dcnv3_fused_cuda
    assert dispatch.resolve("auto", t, "core") is cuda.dcnv3_core_cuda
