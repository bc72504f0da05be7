"""Shared checks of the fused DCNv3 kernels, used by the GPU tests (test_kernel_gpu.py) and by the same kernels in
the CPU emulation (test_kernel_emu.py).

The rule: the kernel's inputs are rounded to the tested dtype once, and the oracle is the pure-PyTorch reference
in float64 on exactly those rounded inputs (so input rounding is not charged to the kernel). Every output and
gradient must then be within a relative L2 error of TOL[dtype]: an all-zero or half-missing gradient has a relative
error near 1 and fails, while a sample that crosses a bilinear cell edge (legitimate in low precision) moves the
L2 norm by little. Inputs and the incoming gradient are seeded per case.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from pretrain.ops import DCNGeometry, FusedParams, cuda, dcnv3_core_reference, dcnv3_fused_reference

# Relative L2 error bounds against float64 on the same rounded inputs. Measured (emulation, 2026-11-30, grad_y
# rounded to the activations' dtype as PyTorch's own backward does): fp32 <= 4e-6, fp16 <= 6e-4, bf16 <= 5e-3
# (mostly the rounding of the outputs themselves, worst on the far-offset case's bias gradients); bounds 2-3x above.
TOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ["out", "value", "x1", "offset_w", "offset_b", "mask_w", "mask_b", "out_w", "out_b", "cfs_w", "cfs_b"]


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    h: int
    w: int
    c: int
    group: int
    offset_scale: float = 1.0
    cfs: bool = False
    remove_center: bool = False
    offset_cells: int = 0  # offsets reach |k| <= this many cells per pixel (0: 3 x offset_scale; make_inputs)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())


def make_inputs(case: Case, device="cpu"):
    """Float64 block inputs; offsets of a few pixels so sampling crosses tiles and image borders.

    No sample lands near a bilinear cell edge, where the offset gradient jumps (its left and right derivatives
    differ) and a 1e-6 difference in the offsets, such as the GPU's fused multiply-adds make, legitimately moves the
    float64 oracle's grad x1 and offset weights by 1e-2 (H stage 1, measured). The offset bias puts every sample at
    a cell's middle (k + 1/2 pixels, |k| <= Case.offset_cells), and the per-pixel part x1 . W_offset stays within a tenth of a pixel
    in 8 standard deviations: the sample never reaches an edge."""
    gen = torch.Generator().manual_seed(case.seed)
    geom = DCNGeometry.make(
        3, 1, 1, 1, group=case.group, offset_scale=case.offset_scale, remove_center=case.remove_center
    )
    g, p, c, s = case.group, geom.points, case.c, case.offset_scale

    def r(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device)

    reach = case.offset_cells or round(3 * s)  # far-offset cases reach past the neighbouring 8x8 tiles
    cells = torch.randint(-reach, reach + 1, (g * p * 2,), generator=gen, dtype=torch.int64).double()
    params = FusedParams(
        r(g * p * 2, c, std=0.0125 / (s * c**0.5)),
        ((cells + 0.5) / s).to(device),
        r(g * p, c, std=1.0 / c**0.5),
        r(g * p, std=0.5),
        r(c, c, std=1.0 / c**0.5),
        r(c, std=0.1),
        r(g, c, std=1.0 / c**0.5) if case.cfs else None,
        r(g, std=0.5) if case.cfs else None,
    )
    shape = (case.n, case.h, case.w, c)
    return r(*shape), r(*shape), params, geom, r(*shape)


def rounded(value, x1, params, dtype, as_dtype=None):
    """Leaves rounded to `dtype` (then held in `as_dtype`, e.g. float64 for the oracle), requiring grad."""
    as_dtype = as_dtype or dtype

    def one(t):
        return t.detach().to(dtype).to(as_dtype).requires_grad_()

    p = FusedParams(*(None if t is None else one(t) for t in vars(params).values()))
    return one(value), one(x1), p


def leaves(value, x1, params):
    return [value, x1, *(t for t in vars(params).values() if t is not None)]


def run_block(fn, value, x1, params, geom, grad_out):
    """[out, grad of every leaf] of fn's block forward + backward."""
    out = fn(value, x1, params, geom)
    grads = torch.autograd.grad(out, leaves(value, x1, params), grad_out.to(out.dtype))
    return [out.detach(), *grads]


def relative_l2(kernel: torch.Tensor, exact: torch.Tensor) -> float:
    return ((kernel.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


def check_block(fn, case: Case, dtype, device="cpu"):
    """Assert fn's block forward and every gradient are within TOL[dtype] of float64 on the same inputs."""
    value, x1, params, geom, grad_out = make_inputs(case, device)
    grad_out = grad_out.to(dtype).double()
    exact = run_block(
        dcnv3_fused_reference, *rounded(value, x1, params, dtype, torch.float64), geom, grad_out
    )
    kernel = run_block(fn, *rounded(value, x1, params, dtype), geom, grad_out)
    names = NAMES if case.cfs else NAMES[:9]
    for name, e, k in zip(names, exact, kernel, strict=True):
        assert k.dtype == dtype and k.shape == e.shape, name
        assert torch.isfinite(k).all(), f"{case.name} {dtype} {name}: non-finite values"
        err = relative_l2(k, e)
        assert err <= TOL[dtype], (
            f"{case.name} {dtype} {name}: relative L2 error {err:.3g} > {TOL[dtype]:.3g}"
        )
    return kernel


def check_core(fn, dtype, stride, device="cpu", group=4):
    """The aggregation alone (offsets and normalised masks given), stride 1 or 2, against float64."""
    geom = DCNGeometry.make(3, stride, 1, 1, group=group, offset_scale=1.0)
    n, h, w, c = 2, 9, 11, 16 * group
    ho, wo = geom.output_size(h, w)
    gen = torch.Generator().manual_seed(7 + stride)
    value = torch.randn(n, h, w, c, dtype=torch.float64, generator=gen)
    # Offsets of a few pixels, never within 0.1 px of an integer: in bf16 an offset near 4 is a multiple of 1/32,
    # so a random one would land exactly on a bilinear cell edge 1 time in 32, where the offset gradient jumps
    # (its left and right derivatives differ) and float64 and the kernel may legitimately take different sides.
    o = torch.randn(n, ho, wo, group * 2 * 9, dtype=torch.float64, generator=gen) * 2
    offset = o.floor() + 0.1 + 0.8 * torch.rand(o.shape, dtype=torch.float64, generator=gen)
    mask = torch.softmax(torch.randn(n, ho, wo, group, 9, dtype=torch.float64, generator=gen), -1).flatten(3)
    grad = torch.randn(n, ho, wo, c, dtype=torch.float64, generator=gen).to(dtype).double()

    def run(f, as_dtype):
        ins = [t.to(dtype).to(as_dtype).to(device).requires_grad_() for t in (value, offset, mask)]
        out = f(*ins, geom)
        return [out.detach(), *torch.autograd.grad(out, ins, grad.to(device, out.dtype))]

    exact, kernel = run(dcnv3_core_reference, torch.float64), run(fn, dtype)
    for name, e, k in zip(["out", "value", "offset", "mask"], exact, kernel, strict=True):
        err = relative_l2(k, e)
        assert err <= TOL[dtype], f"core stride {stride} {dtype} {name}: relative L2 error {err:.3g}"


def require_kernels():
    """GPU tests: skip without CUDA; with CUDA, a missing, broken or self-check-failing extension FAILS."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = cuda.extension_error()
    if reason:
        pytest.fail(f"CUDA is present but the DCNv3 extension is unusable: {reason}")
