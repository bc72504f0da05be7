"""GPU validation of the fused DCNv3 kernels (marker `gpu`).

Without CUDA every test skips. With CUDA, a missing or broken extension FAILS every test (never skips): build
first on the GPU machine with `python -m pretrain.ops.build` (see README). The checks are those of the CPU
emulation suite (tests/kernel_cases.py: float64 oracle on the same rounded inputs, relative L2 per output and
gradient), here at the InternImage stage shapes at 224 px.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    DTYPES,
    NAMES,
    Case,
    check_block,
    check_core,
    make_inputs,
    relative_l2,
    require_kernels,
    rounded,
    run_block,
)

from pretrain.ops import cuda, dispatch

pytestmark = pytest.mark.gpu

SHAPES = [
    Case("T-stage1", 2, 56, 56, 64, 4),  # Cg 16
    Case("T-stage4", 2, 7, 7, 512, 32),
    Case("B-stage1-odd-groups", 1, 56, 56, 112, 7),  # G = 7: a CTA with one live group
    Case("B-stage3", 2, 14, 14, 448, 28),
    Case("H-stage1", 1, 56, 56, 320, 10, cfs=True),  # Cg 32, center-feature-scale
    Case("H-stage4", 2, 7, 7, 2560, 80, cfs=True),
    Case("L-like-scale2", 2, 28, 28, 160, 10, offset_scale=2.0),
    Case("odd-HW-remove-center", 3, 13, 9, 64, 2, cfs=True, remove_center=True),  # Cg 32, P = 8
    Case("batch1-tiny", 1, 1, 3, 32, 2, cfs=True),
]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    require_kernels()


def _cuda_inputs(case, dtype):
    value, x1, params, geom, grad_out = make_inputs(case, device="cuda")
    return (*rounded(value, x1, params, dtype), geom, grad_out.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=[c.name for c in SHAPES])
def test_fused_forward_and_every_gradient(case, dtype):
    check_block(cuda.dcnv3_fused_cuda, case, dtype, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_core_forward_and_gradients(dtype, stride):
    check_core(cuda.dcnv3_core_cuda, dtype, stride, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_batch(dtype):
    """T stage 1 at batch 64: grid sizes and 64-bit offsets in the big-tensor regime, against float64 like every
    case. Not against the reference in dtype, as it was: PyTorch's bf16 grid_sample holds the sampling grid in bf16
    (0.2 px steps at 56 px), which puts that reference itself 7% (CPU, these inputs) to 15% (H200, 2026-11-30) away
    from float64, and TF32 may round the fp32 one."""
    check_block(cuda.dcnv3_fused_cuda, Case("T-stage1-b64", 64, 56, 56, 64, 4), dtype, device="cuda")


def test_poisoned_memory_is_fully_overwritten():
    """Fill the caching allocator with NaN, free it, then run: every output and gradient must be finite."""
    value, x1, params, geom, grad_out = _cuda_inputs(
        Case("poison", 3, 13, 9, 64, 2, cfs=True), torch.bfloat16
    )
    torch.cuda.synchronize()
    poison = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]
    del poison
    results = run_block(cuda.dcnv3_fused_cuda, value, x1, params, geom, grad_out)
    for name, t in zip(NAMES, results):
        assert torch.isfinite(t).all(), f"{name} kept poisoned memory"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_runs_agree_bitwise(dtype):
    """Deterministic backward: no float atomics (fixed-point grad_value, fixed-order split-K reductions)."""
    value, x1, params, geom, grad_out = _cuda_inputs(Case("repeat", 4, 28, 28, 320, 10, cfs=True), dtype)
    first = run_block(cuda.dcnv3_fused_cuda, value, x1, params, geom, grad_out)
    for _ in range(3):
        again = run_block(cuda.dcnv3_fused_cuda, value, x1, params, geom, grad_out)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.parametrize("case", [SHAPES[0], SHAPES[4]], ids=["T-stage1", "H-stage1"])
def test_split_epilogues_give_the_same_bits(case):
    """The output projection and grad x1 as GEMMs of their own (what `pretrain bench dcn` times as kernel-split)
    give the fused epilogues' bits: the same products summed in the same order."""
    args = _cuda_inputs(case, torch.bfloat16)
    with cuda.wpack_in_backward(False):  # grad wpack by the GEMM, as the split form has it
        fused = run_block(cuda.dcnv3_fused_cuda, *args)
    with cuda.fused_epilogues(False):
        split = run_block(cuda.dcnv3_fused_cuda, *args)
    for name, a, b in zip(NAMES, fused, split):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "case", [SHAPES[0], Case("T-stage2", 2, 28, 28, 128, 8)], ids=["T-stage1", "T-stage2"]
)
def test_grad_wpack_in_the_backward_matches_its_gemm(case):
    """grad wpack accumulated in the backward's persistent CTAs (the default where it fits; `pretrain bench dcn`
    times the GEMM form as kernel-wpack-gemm) matches the GEMM over stored grad logits up to fp32 summation order,
    gives the same bits run to run, and leaves every other gradient bitwise unchanged, with any number of CTAs
    (forced: at this batch the automatic choice is the GEMM)."""
    args = _cuda_inputs(case, torch.bfloat16)
    with cuda.wpack_in_backward(False):
        gemm = run_block(cuda.dcnv3_fused_cuda, *args)
    for slots in (1, 7, 132):
        with cuda.wpack_slots(slots):
            fused = run_block(cuda.dcnv3_fused_cuda, *args)
            again = run_block(cuda.dcnv3_fused_cuda, *args)
        for name, a, b, c in zip(NAMES, fused, gemm, again):
            assert torch.equal(a, c), (slots, name)
            if name in ("offset_w", "offset_b", "mask_w", "mask_b"):
                assert relative_l2(a, b.double()) < 1e-2, (slots, name)
            else:
                assert torch.equal(a, b), (slots, name)


@pytest.mark.parametrize(
    "case", [Case("T-stage3", 2, 14, 14, 256, 16), SHAPES[4]], ids=["T-stage3", "H-stage1"]
)
def test_grad_wpack_in_clusters_matches_its_gemm(case):
    """Where one CTA cannot hold grad wpack's partial (T stage 3, H stage 1), clusters of 8 CTAs do on sm_90, each
    a slice of its rows, reading each other's grad logits from distributed shared memory: the same gradients as
    the GEMM up to fp32 summation order, the same bits run to run, every other gradient bitwise unchanged (below
    sm_90 the forced path falls back to the GEMM, which passes the same checks). On sm_90 the device must hold at
    least one such cluster (8 CTAs of about 200 KiB of shared memory each, on 8 SMs of one GPC)."""
    if torch.cuda.get_device_capability()[0] >= 9:
        like = torch.empty(0, dtype=torch.bfloat16, device="cuda")
        resident = cuda.extension().wpack_clusters_resident(like, case.group, case.c, 8)
        assert resident >= 1, f"{case.name}: no cluster of 8 CTAs fits on this device"
    args = _cuda_inputs(case, torch.bfloat16)
    with cuda.wpack_in_backward(False):
        gemm = run_block(cuda.dcnv3_fused_cuda, *args)
    for slots in (1, 3, 16):
        with cuda.wpack_slots(slots):
            fused = run_block(cuda.dcnv3_fused_cuda, *args)
            again = run_block(cuda.dcnv3_fused_cuda, *args)
        for name, a, b, c in zip(NAMES, fused, gemm, again):
            assert torch.equal(a, c), (slots, name)
            if name in ("offset_w", "offset_b", "mask_w", "mask_b"):
                assert relative_l2(a, b.double()) < 1e-2, (slots, name)
            else:
                assert torch.equal(a, b), (slots, name)


# The kernel variants that must give the default kernel's bits, by their `pretrain bench dcn` names (the switches
# come from the bench's own kernel_variant, so what the GPU session times is what is tested here):
#   kernel-8w             the backward's sampling kernel in 8 warps per CTA;
#   kernel-no-masks       the halo recomputed for every pixel of the reach's rectangles (on the GPU the forward's and
#                         backward's logits may round differently, which the masks' one-pixel margin must absorb);
#   kernel-stored-grad-y  grad_y by a GEMM launch, stored and read (the same mma in the same K order, rounded alike);
#   kernel-stored-logits  the forward's fp32 logits stored and read instead of recomputed; kernel-stored-both, both.
SAME_BITS_VARIANTS = (
    "kernel-8w",
    "kernel-no-masks",
    "kernel-stored-grad-y",
    "kernel-stored-logits",
    "kernel-stored-both",
)


@pytest.mark.parametrize("variant", SAME_BITS_VARIANTS)
@pytest.mark.parametrize("case", [SHAPES[0], SHAPES[4]], ids=["T-stage1", "H-stage1"])
def test_kernel_variant_gives_the_same_bits(case, variant):
    from pretrain.bench.blocks import kernel_variant

    args = _cuda_inputs(case, torch.bfloat16)
    default = run_block(cuda.dcnv3_fused_cuda, *args)
    with kernel_variant(variant):
        varied = run_block(cuda.dcnv3_fused_cuda, *args)
    for name, a, b in zip(NAMES, default, varied):
        assert torch.equal(a, b), name


def test_nonfinite_grad_propagates():
    """A NaN in the incoming gradient must reach grad(value) (loss-scaling overflow checks rely on it)."""
    value, x1, params, geom, grad_out = _cuda_inputs(Case("nan", 1, 7, 7, 64, 4), torch.float16)
    grad_out[0, 3, 3, 5] = float("nan")
    grads = run_block(cuda.dcnv3_fused_cuda, value, x1, params, geom, grad_out)
    assert torch.isnan(grads[1]).any()


def test_auto_dispatch_picks_the_built_kernel():
    t = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    assert dispatch.resolve("auto", t, "fused") is cuda.dcnv3_fused_cuda
    assert dispatch.resolve("auto", t, "core") is cuda.dcnv3_core_cuda
