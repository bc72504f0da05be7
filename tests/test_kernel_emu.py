"""The real csrc kernels, run in the CPU emulation (pretrain.ops.emulation, backend "cuda-emu"), against the
float64 reference: forward and every gradient, every dtype, tile tails in M/N/K, odd group counts, remove_center,
center-feature-scale, offset_scale 2, 16 and 32 channels per group; determinism and thread-order independence
(the race detector); the emulation's counters; and mutants -- kernels with a deliberately injected bug -- that
this suite must reject.

The first run builds the emulation (about a minute of g++ on 2 cores, cached by a hash of the sources under
~/.cache/internimage_pretrain/dcnv3-emu); skipped only where g++, CUTLASS or the CUDA headers are missing.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    DTYPES,
    NAMES,
    TOL,
    Case,
    check_block,
    check_core,
    make_inputs,
    relative_l2,
    rounded,
    run_block,
)

from pretrain.ops import DCNGeometry, cuda, dcnv3_fused_reference, emulation

pytestmark = pytest.mark.slow

# Small shapes chosen for coverage: pixels M = n*h*w not a multiple of the 64-pixel tile, packed-logit columns
# G*28 not a multiple of 8 (odd G: rows padded with zeros; a CTA with one live group), K = C not a multiple of 32.
CASES = [
    Case("cg16-tails-k48", n=1, h=5, w=13, c=48, group=3),
    Case("cg32-cfs-scale2", n=2, h=6, w=7, c=96, group=3, offset_scale=2.0, cfs=True),
    Case("cg32-remove-center", n=1, h=9, w=8, c=64, group=2, cfs=True, remove_center=True),
    Case("cg16-g8-batch2", n=2, h=4, w=9, c=128, group=8),
    # Many 8x8 grad-value tiles, offsets of about 8 pixels: sources reach past the neighbouring tiles.
    Case("cg16-far-offsets-tiles", n=2, h=19, w=21, c=32, group=2, offset_scale=4.0),
]


@pytest.fixture(scope="session")
def emu():
    reason = emulation.missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    emulation.build()  # a build error fails here, with the compiler's message
    ext = emulation.extension()
    assert ext is not None, emulation.error()
    return ext


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fused_block_matches_float64(emu, case, dtype):
    check_block(cuda.dcnv3_fused_emu, case, dtype)


def test_grad_value_gathers_sources_from_every_tile_of_the_image(emu):
    """Offsets of up to about 30 pixels on a 48x44 map: every 8x8 value tile's sources come from all 36 output
    tiles (more than one batch of source rectangles, kMaxRects = 32), and the value window is too small for the
    reach (corners outside it come from global memory)."""
    case = Case(
        "cg16-reach-over-many-tiles", n=1, h=48, w=44, c=32, group=2, offset_scale=8.0, offset_cells=40
    )
    value, x1, params, geom, _ = make_inputs(case)
    value, x1, params = rounded(value, x1, params, torch.float32)
    wpack, bpack = cuda.pack_projection(params, geom, torch.float32)
    _, _, reach, _ = cuda.fused_fwd(
        value.detach(), x1.detach(), wpack.detach(), bpack.detach(), params.output_weight.detach(),
        params.output_bias.detach(), cuda.geometry_list(geom), geom.offset_scale, False, True, False,
    )  # fmt: skip
    # the image's reach, 6x6 tiles', then a uint16 touch mask per pixel (one group pair)
    assert (
        reach.shape == (1, 1 + 6 * 6 + 48 * 44 // 2)
        and reach[0, 0] >= 44
        and (reach[0, 1:37] >= 24).sum() >= 33
    )
    for dtype in (torch.float32, torch.bfloat16):
        check_block(cuda.dcnv3_fused_emu, case, dtype)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_core_op_matches_float64(emu, dtype, stride):
    check_core(cuda.dcnv3_core_emu, dtype, stride)


@pytest.mark.parametrize("stride", [1, 2])
def test_packed_rows_of_odd_groups_end_in_zeros(emu, stride):
    """G = 3: a packed row holds 84 live columns padded to 88 (16-byte rows). The core op's backward writes zeros
    into the padding of grad logits (stride 2 stores them from the grad-logits kernel directly, stride 1 through
    shared memory), so a GEMM over whole rows adds nothing there; results match float64."""
    check_core(cuda.dcnv3_core_emu, torch.float32, stride, group=3)
    geom = DCNGeometry.make(3, stride, 1, 1, group=3, offset_scale=1.0)
    value = torch.randn(1, 9, 11, 48)
    ho, wo = geom.output_size(9, 11)
    offset, mask = torch.randn(1, ho, wo, 3 * 18), torch.rand(1, ho, wo, 3 * 9)
    logits = cuda.pack_logits(offset, mask, geom, torch.float32)
    assert logits.shape[-1] == cuda.packed_cols(3) == emulation.extension().packed_cols(3) == 88
    ext, args = emulation.extension(), (ho, wo, cuda.geometry_list(geom), 1.0, False, False)
    _, reach = ext.sample_fwd(value, None, None, None, logits, *args)
    _, grad_logits = ext.sample_bwd(torch.randn(1, ho, wo, 48), value, None, None, None, logits, *args, reach)
    assert torch.isfinite(grad_logits).all() and not grad_logits[..., 84:].any()
    assert grad_logits[..., :84].abs().sum() > 0


def _block(case, dtype, grad_scale=None):
    """[out, grads...] of the emulated kernels on `case` in `dtype`."""
    value, x1, params, geom, grad_out = make_inputs(case)
    if grad_scale is not None:
        grad_out = grad_scale(grad_out)
    return run_block(cuda.dcnv3_fused_emu, *rounded(value, x1, params, dtype), geom, grad_out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_thread_order_does_not_change_results(emu, dtype):
    """The race detector: a CTA's threads resumed forward, reversed or shuffled between barriers must give
    bit-identical results (a missing __syncthreads makes them differ: see the mutant test below)."""
    case = CASES[1]
    first = _block(case, dtype)
    for mode, seed in (("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
        with emulation.thread_order(mode, seed):
            again = _block(case, dtype)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b), f"results depend on the thread order ({mode}, seed {seed})"


def test_repeated_runs_agree_bitwise(emu):
    """Deterministic backward: fixed-point grad(value), fixed-order split-K reductions."""
    first = _block(CASES[3], torch.float16)
    for a, b in zip(first, _block(CASES[3], torch.float16), strict=True):
        assert torch.equal(a, b)


def test_nonfinite_grad_propagates(emu):
    """A NaN in the incoming gradient must reach grad(value) (loss-scaling overflow checks rely on it)."""

    def poison(g):
        g = g.clone()
        g[0, 2, 3, 5] = float("nan")
        return g

    grads = _block(CASES[0], torch.float16, poison)
    assert torch.isnan(grads[1]).any()


def test_grad_value_outlier_costs_no_precision_elsewhere(emu):
    """The fixed-point scale of grad(value) is per (image, channel): a gradient 1e10 x larger in one channel
    of one image leaves every other channel at fp32 accuracy (a tensor-wide scale gave 5.5e-2 error)."""
    geom_case = Case("outlier", n=2, h=6, w=6, c=64, group=4)
    value, _, _, _, _ = make_inputs(geom_case)
    from pretrain.ops import DCNGeometry, dcnv3_core_reference

    geom = DCNGeometry.make(3, 1, 1, 1, group=4)
    gen = torch.Generator().manual_seed(3)
    offset = torch.randn(2, 6, 6, 4 * 18, generator=gen, dtype=torch.float64)
    mask = torch.softmax(torch.randn(2, 6, 6, 4, 9, generator=gen, dtype=torch.float64), -1).flatten(3)
    grad = torch.randn(2, 6, 6, 64, generator=gen, dtype=torch.float64)
    grad[0, 2, 3, 5] = 1e10
    grads = []
    for fn, dt in ((dcnv3_core_reference, torch.float64), (cuda.dcnv3_core_emu, torch.float32)):
        v = value.to(torch.float32).to(dt).requires_grad_()
        out = fn(v, offset.float().to(dt), mask.float().to(dt), geom)
        (g,) = torch.autograd.grad(out, v, grad.float().to(dt))
        grads.append(g.double())
    exact, kernel = grads
    err = (kernel - exact).norm(dim=(1, 2)) / exact.norm(dim=(1, 2))  # (image, channel)
    others = torch.ones_like(err, dtype=torch.bool)
    others[0, 5] = False
    assert err[others].max() < 1e-5, f"worst other channel: {err[others].max():.3g}"
    assert err[0, 5] < 1e-5


CONCENTRATED_TOL = 1e-6  # 2.1e-8 measured (2026-11-30); lost carries give percents


def concentrated_grad_error() -> float:
    """Relative error of grad value (core op, fp32) against float64 where every sample of every pixel lands in
    one bilinear cell (at exactly representable fractions): its 4 pixels take 24 x 24 x 9 same-sign terms each,
    64 source pixels per chunk over 9 chunks, so the accumulator's low words carry into the high ones many times
    (and would overflow without)."""
    from pretrain.ops import dcnv3_core_reference
    from pretrain.ops.reference import sampling_locations

    n, h, w, c, group = 1, 24, 24, 32, 2
    geom = DCNGeometry.make(3, 1, 1, 1, group=group)
    gen = torch.Generator().manual_seed(11)
    value = torch.randn(n, h, w, c, generator=gen).double()
    zero = torch.zeros(n, h, w, group * geom.points * 2, dtype=torch.float64)
    x0, y0 = sampling_locations(geom, zero, h, w)
    x1, y1 = sampling_locations(geom, zero + 1, h, w)
    offset = torch.stack(((11.25 - x0) / (x1 - x0), (12.5 - y0) / (y1 - y0)), -1).flatten(3)
    mask = torch.softmax(torch.randn(n, h, w, group, geom.points, generator=gen, dtype=torch.float64), -1)
    mask = mask.flatten(3)
    grad = torch.rand(n, h, w, c, generator=gen, dtype=torch.float64) + 0.5  # one sign: the sums only grow
    grads = []
    for fn, dt in ((dcnv3_core_reference, torch.float64), (cuda.dcnv3_core_emu, torch.float32)):
        v = value.float().to(dt).requires_grad_()
        out = fn(v, offset.float().to(dt), mask.float().to(dt), geom)
        (g,) = torch.autograd.grad(out, v, grad.float().to(dt))
        grads.append(g.double())
    exact, kernel = grads
    assert exact[0, 12:14, 11:13].abs().min() > 100 * exact.abs().max() / 1e3  # the 4 pixels hold the sums
    return ((kernel - exact).norm() / exact.norm()).item()


def test_grad_value_of_concentrated_samples_stays_exact(emu):
    """Thousands of same-sign terms on the same 4 pixels: the fixed-point sum stays at fp32 accuracy."""
    err = concentrated_grad_error()
    assert err < CONCENTRATED_TOL, err


def test_fused_grad_value_scale_bound_keeps_images_apart(emu):
    """The fused backward scales grad value by a bound of max |grad_y| (from grad_out's per-image maxima and |wout|):
    a grad_out 1e10 x larger at one pixel of image 0 leaves image 1 at fp32 accuracy, and image 0 too (its bound
    is about the outlier's own grad_y)."""
    case = Case("outlier-fused", n=2, h=6, w=6, c=64, group=4)
    value, x1, params, geom, grad_out = make_inputs(case)
    grad_out[0, 2, 3, 5] = 1e10
    grads = []
    for dtype in (torch.float64, torch.float32):
        v, x, p = rounded(value, x1, params, torch.float32, dtype)
        fn = dcnv3_fused_reference if dtype == torch.float64 else cuda.dcnv3_fused_emu
        (g,) = torch.autograd.grad(fn(v, x, p, geom), v, grad_out.float().to(dtype))
        grads.append(g.double())
    exact, kernel = grads
    err = (kernel - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)  # per image
    assert err.max() < 1e-5, err


def test_unused_internal_output_gets_no_materialised_gradient(emu):
    """y (the internal output kept for grad W_out) never reaches the loss: autograd must not allocate and
    zero-fill a gradient of its size for the op's backward (128 MB per block at InternImage-H stage 1)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    value, x1, params, geom, grad_out = make_inputs(CASES[0])
    value, x1, params = rounded(value, x1, params, torch.float32)
    out = cuda.dcnv3_fused_emu(value, x1, params, geom)
    fills = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if ("zero" in str(func) or "fill" in str(func)) and isinstance(result, torch.Tensor):
                fills.append((str(func), tuple(result.shape)))
            return result

    with Spy():
        torch.autograd.grad(out, [value, x1], grad_out.float())
    assert not [f for f in fills if f[1] == tuple(value.shape) and "zeros_like" in f[0]], fills


def test_counters_of_one_gemm_tile(emu):
    """One 64x64 output tile with K = 32 in bf16: 64 mma.sync (m16n8k16) per CTA, fed by ldmatrix; A and B read
    once (8 KiB), the output written once (8 KiB), every request fully coalesced."""
    a = torch.randn(64, 32).bfloat16()
    w = torch.randn(64, 32).bfloat16()
    with emulation.count() as launches:
        out = emu.linear_fwd(a, w, None)
    torch.testing.assert_close(out.float(), a.float() @ w.float().t(), rtol=1e-2, atol=1e-2)
    [gemm] = launches
    assert gemm["kernel"] == "gemm" and gemm["grid"] == [1, 1, 1]
    assert gemm["mma"] == 64
    assert gemm["unique_load_sectors"] * 32 == 2 * 64 * 32 * 2
    assert gemm["unique_store_sectors"] * 32 == 64 * 64 * 2
    assert gemm["load_bytes"] == 2 * 64 * 32 * 2 and gemm["atomics"] == 0
    assert gemm["shared_store_bytes"] >= 2 * 64 * 32 * 2
    # The mma fragments come through ldmatrix.x4: per warp (a 32x32 piece) 4 for A and 4 for B, one 16-byte row
    # per lane each (element-wise fragment loads were 8192 2-byte loads per CTA); the epilogue reads the fp32
    # result tile once, 4 values per 16-byte load.
    assert gemm["shared_loads"] == 4 * 8 * 32 + 64 * 64 // 4
    assert gemm["shared_load_bytes"] == 4 * 8 * 32 * 16 + 64 * 64 * 4
    # ... and stores 8 outputs per 16-byte vector: 512 bytes per warp request (2-byte element stores took 128).
    assert gemm["store_requests"] == 64 * 64 * 2 // 512
    # Staging: one 16-byte store per 16-byte load (64 rows x 32 k of A and of B: 512 vectors), then the fp32
    # result tile (64 x 64 elements).
    assert gemm["shared_stores"] == 512 + 64 * 64
    # Staged as 16-byte vectors: a warp request is 32 lanes x 16 bytes = 16 whole sectors.
    assert gemm["load_sectors"] == 16 * gemm["load_requests"] == gemm["unique_load_sectors"]


def test_row_blocks_without_a_live_row_cost_no_mma(emu):
    """The fused kernels' tile GEMMs skip each 32-row block of a 64-row tile that holds no live pixel (every warp
    alike): a forward over 8-wide, 4-high tiles, or 4-wide, 8-high ones (a tile lists its live pixels first), issues
    exactly half the mma of one over 8x8 tiles, as a halo chunk of at most 32 pixels does (its rows are compacted to
    the front too). Skipped rows are rows nobody stores, so every output stays the same (the float64 and bitwise
    tests cover tiles and chunks of every fill)."""
    from pretrain.bench.dcn_counters import count_block

    def mma(h, w):
        return sum(launch["mma"] for launch in count_block(1, h, w, 64, 4, False, torch.bfloat16)["infer"])

    full = mma(8, 8)
    assert full > 0 and 2 * mma(4, 8) == full and 2 * mma(8, 4) == full


def test_counters_name_the_source_lines_of_their_traffic(emu):
    """Each launch's traffic per call site adds up to its totals, and the sites resolve to source lines through
    the build's line tables: one GEMM tile's loads are the operand staging of tile_gemm.cuh (its cp.async), its
    stores the epilogue of gemm.cuh (through common.cuh's vector store)."""
    a, w = torch.randn(64, 32).bfloat16(), torch.randn(64, 32).bfloat16()
    with emulation.count() as launches:
        emu.linear_fwd(a, w, None)
    [gemm] = launches
    sites = gemm["sites"]
    assert sum(s[3] for s in sites if s[1] == 0) == gemm["load_sectors"]
    assert sum(s[2] for s in sites if s[1] == 1) == gemm["store_requests"]
    lines = emulation.source_lines([s[0] for s in sites])
    loads = [lines[s[0]].split(" < ") for s in sites if s[1] == 0]
    stores = [lines[s[0]].split(" < ") for s in sites if s[1] == 1]
    assert loads and all(x[0].startswith("tile_gemm.cuh:") for x in loads), loads
    assert stores and all(x[-1].startswith("gemm.cuh:") for x in stores), stores


def test_transposed_operands_are_staged_as_vectors_too(emu):
    """grad . w reads w transposed in place (the unit stride runs along the tile's rows): still one 16-byte load
    per lane, 16 sectors per warp request, and the product is exact in fp32 accumulation."""
    gen = torch.Generator().manual_seed(11)
    grad = torch.randn(64, 64, generator=gen).bfloat16()
    w = torch.randn(64, 128, generator=gen).bfloat16()
    with emulation.count() as launches:
        out = emu.linear_bwd_input(grad, w)
    [gemm] = launches
    assert gemm["load_sectors"] == 16 * gemm["load_requests"] == gemm["unique_load_sectors"]
    # w is staged MN-major, as it lies: a 16-byte load is one 16-byte shared store, not 8 element stores (B: 128
    # rows x 64 k, A: 64 x 64, over 2 K-steps: 1536 vectors), then the fp32 result tile (64 x 128).
    assert gemm["shared_stores"] == (128 * 64 + 64 * 64) // 8 + 64 * 128
    exact = (grad.double() @ w.double()).bfloat16()
    assert (out.float() - exact.float()).abs().max() <= exact.float().abs().max() * 2**-7


@pytest.mark.parametrize("width", [16, 13], ids=["vector-rows", "element-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradient_split_k_in_one_launch(emu, dtype, width):
    """grad W and grad b of a projection over many rows: split-K (over 8 splits here), the last split of each output
    tile summing the fp32 partials in split order, bias gradient in the same launch; against float64, and bitwise
    the same when the CTAs run in another order (which split arrives last must not matter). Rows of 16 move as
    16-byte vectors (partials, sums, output), rows of 13 element by element."""
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(3 * 4096, 20, generator=gen).to(dtype)
    a = torch.randn(3 * 4096, width, generator=gen).to(dtype)
    with emulation.count() as launches:
        gw, gb, _ = emu.linear_bwd_weight(grad, a)
    [gemm] = launches
    assert gemm["kernel"] == "gemm" and gemm["grid"][2] > 8
    exact_w = grad.double().t() @ a.double()
    exact_b = grad.double().sum(0)
    for got, exact in ((gw, exact_w), (gb, exact_b)):
        err = ((got.double() - exact).norm() / exact.norm()).item()
        assert err < TOL[dtype], err
    with emulation.thread_order("shuffle", seed=3, ext=emu):
        gw2, gb2, _ = emu.linear_bwd_weight(grad, a)
    assert torch.equal(gw, gw2) and torch.equal(gb, gb2)


@pytest.mark.parametrize("n", [24, 13], ids=["vector-rows", "element-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_with_bias_on_either_epilogue_path(emu, dtype, n):
    """out = a . w^T + bias over two row tiles: whole 16-byte output vectors where the row width allows (24), one
    element at a time otherwise (13); against float64 on the same rounded inputs."""
    gen = torch.Generator().manual_seed(8)
    a, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((70, 40), (n, 40), (n,)))
    out = emu.linear_fwd(a, w, b)
    exact = a.double() @ w.double().t() + b.double()
    err = ((out.double() - exact).norm() / exact.norm()).item()
    assert out.shape == (70, n) and err < TOL[dtype], err


def test_grad_out_absmax_in_the_weight_gradient_launch(emu):
    """grad wout's GEMM also takes max |grad_out| per image (400 rows) and channel while its first-column tiles read
    grad_out for the bias gradient: equal to the plain max across 3 splits that straddle images, +inf for NaN."""
    gen = torch.Generator().manual_seed(6)
    grad = torch.randn(5 * 400, 24, generator=gen).bfloat16()
    a = torch.randn(5 * 400, 40, generator=gen).bfloat16()
    grad[3 * 400 + 17, 5] = float("nan")
    with emulation.count() as launches:
        _, _, absmax = emu.linear_bwd_weight(grad, a, 400)
    assert [launch["kernel"] for launch in launches] == ["gemm"] and launches[0]["grid"][2] == 3
    expected = grad.view(5, 400, 24).float().abs().amax(1)
    assert torch.isinf(absmax[3, 5]) and torch.isinf(absmax).sum() == 1
    expected[3, 5] = absmax[3, 5]
    assert torch.equal(absmax, expected)


PASSES_PER_ATOMIC_REQUEST = 1.5  # 1.00 measured (2026-11-30, fp32, 16 channels per group)


def test_counters_see_the_scatter_in_shared_memory(emu):
    """The backward's grad(value) scatter runs in shared memory (owner-computes): one or two 32-bit shared atomics
    (the fixed point's hi and lo words) per (point, corner inside, channel), spread over the banks (about one
    pass per warp request here; the 64-bit accumulator's took about 13 at T and H), no global atomic, no
    accumulator pass, and (stride 1) one sampling launch that also writes grad logits and grad x1 (its
    epilogue). The forward is one launch (the output projection is its epilogue) whose only global atomics record
    the reach: two per 8x8 tile."""
    value, x1, params, geom, grad_out = make_inputs(CASES[0])
    value, x1, params = rounded(value, x1, params, torch.float32)
    with emulation.count() as fwd:
        out = cuda.dcnv3_fused_emu(value, x1, params, geom)
    with emulation.count() as launches:
        torch.autograd.grad(out, [value], grad_out.float())
    n, h, w, c = value.shape
    [sample_fwd] = fwd
    assert sample_fwd["kernel"] == "dcn_fwd_out"
    assert sample_fwd["atomics"] == 2 * n * -(-h // 8) * -(-w // 8)
    kernels = [launch["kernel"] for launch in launches]
    # grad wout (and max |grad_out|: the fixed-point scales), the sampling backward (grad_y recomputed from
    # grad_out per tile, never stored; grad x1 its epilogue), grad wpack: no grad_y GEMM, no absmax pass.
    assert kernels == ["gemm", "dcn_bwd_x1", "gemm"], kernels
    bwd = launches[1]
    # At most 4 corners x 9 points per pixel and channel; most corners are inside at these offsets.
    assert bwd["atomics"] == 0
    assert 0.5 * 36 * n * h * w * c < bwd["shared_atomics"] <= 2 * 36 * n * h * w * c
    passes = bwd["shared_atomic_wavefronts"] / bwd["shared_atomic_requests"]
    assert 1 <= passes < PASSES_PER_ATOMIC_REQUEST, passes
    assert (
        bwd["unique_store_sectors"] * 32
        == 2 * value.numel() * 4 + n * h * w * cuda.packed_cols(geom.group) * 4
    )  # grad value, grad x1, grad logits, once each
    assert bwd["mma"] == 0  # fp32 projections run as FFMA (no TF32), like PyTorch's default
    assert bwd["load_sectors"] >= bwd["unique_load_sectors"] > 0


def test_forward_fuses_the_output_projection_and_stores_y_only_for_training(emu):
    """One forward launch writes out (and y only when a gradient can flow: y is grad wout's input), and its output
    equals the two-launch path's (sampling kernel, then GEMM) bitwise: the same products in the same order."""
    value, x1, params, geom, _ = make_inputs(CASES[0])
    value, x1, params = rounded(value, x1, params, torch.bfloat16)
    with emulation.count() as train:
        out = cuda.dcnv3_fused_emu(value, x1, params, geom)
    with torch.no_grad(), emulation.count() as infer:
        out_infer = cuda.dcnv3_fused_emu(value, x1, params, geom)
    assert [launch["kernel"] for launch in train] == ["dcn_fwd_out"] == [launch["kernel"] for launch in infer]
    tiles = value.shape[0] * -(-value.shape[1] // 8) * -(-value.shape[2] // 8)
    pairs = -(-CASES[0].group // 2)
    out_bytes = out.numel() * 2  # the reach is recorded by atomics (counted apart): 2 per tile
    touch_bytes = out.numel() // out.shape[-1] * pairs * 2  # a uint16 touch mask per pixel and group pair
    touch_sectors = infer[0]["unique_store_sectors"] - out_bytes // 32
    assert touch_bytes <= 32 * touch_sectors <= touch_bytes + 64 and infer[0]["atomics"] == 2 * tiles
    # out is stored in 16-byte vectors per lane (a warp request of whole rows: 512 bytes where the tile is full);
    # the touch masks take one request per warp, tile and group pair.
    assert infer[0]["store_bytes"] == out_bytes + touch_bytes
    assert infer[0]["store_requests"] <= out_bytes / 256 + tiles * 4 * pairs
    assert train[0]["unique_store_sectors"] == 2 * out_bytes // 32 + touch_sectors  # out, y and the masks
    assert torch.equal(out, out_infer)
    wpack, bpack = cuda.pack_projection(params, geom, torch.bfloat16)
    y, _ = emulation.extension().sample_fwd(
        value.detach(), x1.detach(), wpack.detach(), bpack.detach(), None, *value.shape[1:3],
        cuda.geometry_list(geom), geom.offset_scale, True, False,
    )  # fmt: skip
    two_launch = emulation.extension().linear_fwd(
        y, params.output_weight.detach(), params.output_bias.detach()
    )
    assert torch.equal(out.detach(), two_launch)


def test_split_epilogues_give_the_same_bits(emu):
    """With the epilogues split (cuda.fused_epilogues(False): the output projection and grad x1 as GEMMs of their
    own, what `pretrain bench dcn` times as kernel-split), every output and gradient is bitwise the fused path's:
    the same products summed in the same order."""
    value, x1, params, geom, grad_out = make_inputs(CASES[1])
    args = rounded(value, x1, params, torch.bfloat16)
    with cuda.wpack_in_backward(False, device="cpu"):  # grad wpack by the GEMM, as the split form has it
        fused = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
    with cuda.fused_epilogues(False, device="cpu"), emulation.count() as launches:
        split = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
    assert [launch["kernel"] for launch in launches] == [
        "dcn_fwd",
        "gemm",
        "gemm",
        "dcn_bwd_value",
        "gemm",
        "gemm",
    ]
    assert emulation.extension().fused_epilogues()  # restored
    for a, b in zip(fused, split, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_eight_warp_backward_gives_the_same_bits(emu, dtype, fused):
    """cuda.backward_threads(256): the one-launch backward in 8 warps per CTA (what `pretrain bench dcn` times as
    kernel-8w) gives every gradient bitwise as 4 warps do, with grad x1 fused or not, in every CTA thread order
    (the race detector): each output of the tile GEMMs still sums its K steps in order, and the fixed-point scatter
    is order-free. Cases: Cg 16 with tails, and Cg 32 with cfs (odd G: the padding column)."""
    ext = emulation.extension()
    for case in (CASES[0], CASES[1]):
        value, x1, params, geom, grad_out = make_inputs(case)
        args = rounded(value, x1, params, dtype)
        with cuda.fused_epilogues(fused, device="cpu"):
            four = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
            with cuda.backward_threads(256, device="cpu"):
                with emulation.count() as launches:
                    eight = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
                with emulation.thread_order("shuffle", 3):
                    shuffled = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
        sampling = [launch for launch in launches if launch["kernel"].startswith("dcn_bwd")]
        assert [launch["kernel"] for launch in sampling] == ["dcn_bwd_x1" if fused else "dcn_bwd_value"]
        assert sampling[0]["block"] == 256, sampling[0]["block"]
        assert all(launch["block"] == 128 for launch in launches if launch not in sampling)
        for a, b, c in zip(four, eight, shuffled, strict=True):
            assert torch.equal(a, b) and torch.equal(b, c)
    assert ext.backward_threads() == 128  # restored
    with pytest.raises(RuntimeError, match="128 or 256"):
        ext.set_backward_threads(192)


# The variant tests' blocks: Cg 16 with edge tiles, and Cg 32 with cfs and odd G (the padding column).
_VARIANT_SHAPES = [(1, 19, 21, 64, 4, False), (1, 17, 18, 96, 3, True)]


def _assert_same_bits(expected, *others, label=None):
    """Every tensor of each of `others` (lists of a block's outputs and gradients) equals expected's, bit for bit."""
    for other in others:
        for a, b in zip(expected, other, strict=True):
            assert torch.equal(a, b), label


def _bench_block_grads(shape, dtype, offset_std):
    """[out, grads...] of one fused block forward + backward on `pretrain bench dcn`'s random inputs."""
    from pretrain.bench.blocks import make_block

    torch.manual_seed(0)
    value, x1, params, geom = make_block(*shape, dtype, "cpu", offset_std)
    out = cuda.dcnv3_fused_emu(value, x1, params, geom)
    out.backward(torch.randn_like(out))
    leaves = [value, x1, *(t for t in vars(params).values() if t is not None)]
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_halo_masks_give_the_same_bits_with_less_work(emu, dtype):
    """The forward records, per output pixel and group pair, which nearby value tiles its samples can reach (give
    or take a pixel); the one-launch backward then skips the halo pixels that cannot scatter into its tile. A skipped
    pixel adds nothing, so every output and gradient is bitwise what the unmasked backward gives -- a mask that
    missed a tile would change grad value -- over offsets from none (a fresh block) to 3 pixels (past the
    neighbouring tiles at the far end, which masks never rule out), Cg 16 and Cg 32 with cfs and odd G, 4 and 8 warps,
    in every thread order; and the backward does less tensor-core work (counted)."""
    shapes = _VARIANT_SHAPES
    for shape in shapes:
        for std in (0.0, 1.0, 3.0):
            masked = _bench_block_grads(shape, dtype, std)
            with cuda.halo_masks(False, device="cpu"):
                unmasked = _bench_block_grads(shape, dtype, std)
            _assert_same_bits(masked, unmasked, label=(shape, std))
    with cuda.backward_threads(256, device="cpu"), emulation.thread_order("shuffle", 5):
        eight = _bench_block_grads(shapes[1], dtype, 1.0)
    with cuda.halo_masks(False, device="cpu"):
        four = _bench_block_grads(shapes[1], dtype, 1.0)
    _assert_same_bits(four, eight)
    assert emulation.extension().halo_masks()  # restored

    if dtype == torch.bfloat16:  # (fp32 runs FFMA: no mma to count)
        from pretrain.bench.dcn_counters import count_block, summarise

        mma = {}
        for enabled in (True, False):
            with cuda.halo_masks(enabled, device="cpu"):
                counted = count_block(1, 24, 24, 64, 4, False, dtype, offset_std=1.0)
            mma[enabled] = summarise(counted["bwd"], 24 * 24)["mma"]
        assert mma[True] < 0.8 * mma[False], mma


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_stored_grad_y_gives_the_same_bits_with_less_tensor_core_work(emu, dtype):
    """cuda.stored_grad_y(True): grad_y = grad_out . W_out by one GEMM launch, stored, and copied per chunk by the
    backward instead of recomputed there for its own tile and every halo chunk. The GEMM sums K in the tile GEMM's
    order and rounds to T as the recompute does, so every output and gradient is bitwise the same (a different
    rounding or K order would change grad value and grad logits), Cg 16 and Cg 32 with cfs and odd G, with grad
    wpack in the kernel and by a GEMM, 4 and 8 warps, in every thread order. Counted: one launch more, less mma in
    the backward (the halo's grad_y GEMMs are gone), more DRAM bytes (grad_y written and read back)."""
    shapes = _VARIANT_SHAPES
    for shape in shapes:
        recomputed = _bench_block_grads(shape, dtype, 2.0)
        with cuda.stored_grad_y(True, device="cpu"):
            stored = _bench_block_grads(shape, dtype, 2.0)
            with cuda.backward_threads(256, device="cpu"), emulation.thread_order("shuffle", 7):
                eight = _bench_block_grads(shape, dtype, 2.0)
            with cuda.wpack_slots(3, device="cpu"):
                in_kernel = _bench_block_grads(shape, dtype, 2.0)
        with cuda.wpack_slots(3, device="cpu"):
            in_kernel_recomputed = _bench_block_grads(shape, dtype, 2.0)
        _assert_same_bits(recomputed, stored, eight, label=shape)
        _assert_same_bits(in_kernel_recomputed, in_kernel, label=shape)
    assert not emulation.extension().stored_grad_y()  # restored

    if dtype == torch.bfloat16:  # (fp32 runs FFMA: no mma to count)
        from pretrain.bench.dcn_counters import count_block, summarise

        counts = {}
        for enabled in (False, True):
            with cuda.stored_grad_y(enabled, device="cpu"):
                counted = count_block(1, 24, 24, 64, 4, False, dtype, offset_std=1.0)
            counts[enabled] = summarise(counted["bwd"], 24 * 24)
        before, after = counts[False], counts[True]
        assert after["launches"] == before["launches"] + 1, (before, after)
        assert after["mma"] < 0.9 * before["mma"], (before["mma"], after["mma"])
        # grad_y (C = 64 bf16: 128 bytes a pixel) written, then read back at least once
        assert after["dram_floor_bytes"] > before["dram_floor_bytes"] + 128, (before, after)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_stored_logits_give_the_same_bits_with_less_tensor_core_work(emu, dtype):
    """cuda.stored_logits(True): the training forward also writes its fp32 logits (x1 . wpack^T + bpack) and the
    backward reads them instead of recomputing them per chunk of its own tile and halo. They are the values the
    recompute gives, so every output and gradient is bitwise the same (a logit stored in T, or without its bias,
    would change grad value and grad logits): Cg 16 and Cg 32 with cfs and odd G (the last pair's 28 columns), the
    output projection fused and not, with grad_y stored too, grad wpack in the kernel, 8 warps, every thread order.
    Counted: less mma in the backward, more DRAM bytes (packed_cols(G) floats a pixel written and read back)."""
    shapes = _VARIANT_SHAPES
    for shape in shapes:
        recomputed = _bench_block_grads(shape, dtype, 2.0)
        with cuda.stored_logits(True, device="cpu"):
            stored = _bench_block_grads(shape, dtype, 2.0)
            with cuda.fused_epilogues(False, device="cpu"):
                split = _bench_block_grads(shape, dtype, 2.0)
            with cuda.stored_grad_y(True, device="cpu"), cuda.wpack_slots(3, device="cpu"):
                with cuda.backward_threads(256, device="cpu"), emulation.thread_order("shuffle", 9):
                    both = _bench_block_grads(shape, dtype, 2.0)
        with cuda.wpack_slots(3, device="cpu"):
            in_kernel = _bench_block_grads(shape, dtype, 2.0)
        _assert_same_bits(recomputed, stored, split, label=shape)
        _assert_same_bits(in_kernel, both, label=shape)
    assert not emulation.extension().stored_logits()  # restored

    # inference (no gradient wanted) stores nothing; training stores (N, H, W, packed_cols(G)) fp32
    torch.manual_seed(0)
    from pretrain.bench.blocks import make_block

    value, x1, params, geom = make_block(1, 9, 10, 64, 4, False, dtype, "cpu")
    wpack, bpack = cuda.pack_projection(params, geom, dtype)
    args = (value.detach(), x1.detach(), wpack.detach(), bpack.detach(), params.output_weight.detach())
    args = (*args, params.output_bias.detach(), cuda.geometry_list(geom), geom.offset_scale, False, True)
    with cuda.stored_logits(True, device="cpu"):
        assert cuda.fused_fwd(*args, False)[3].numel() == 0
        out, _, _, logits = cuda.fused_fwd(*args, True)
    assert logits.shape == (1, 9, 10, cuda.packed_cols(4)) and logits.dtype == torch.float32
    expected = torch.nn.functional.linear(args[1].float(), args[2].float(), args[3].float())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with cuda.stored_logits(True, device="cpu"):  # the fake impl knows the switch (torch.compile traces it)
        torch.library.opcheck(cuda.fused_fwd, (*args, True), test_utils=("test_schema", "test_faketensor"))

    if dtype == torch.bfloat16:  # (fp32 runs FFMA: no mma to count)
        from pretrain.bench.dcn_counters import count_block, summarise

        counts = {}
        for enabled in (False, True):
            with cuda.stored_logits(enabled, device="cpu"):
                counted = count_block(1, 24, 24, 64, 4, False, dtype, offset_std=1.0)
            counts[enabled] = {k: summarise(counted[k], 24 * 24) for k in ("fwd", "bwd")}
        before, after = counts[False], counts[True]
        assert after["fwd"]["mma"] == before["fwd"]["mma"], (before, after)
        assert after["bwd"]["mma"] < 0.8 * before["bwd"]["mma"], (before["bwd"]["mma"], after["bwd"]["mma"])
        # 4 groups: 112 logits, 448 bytes a pixel, written by the forward and read back by the backward, whose
        # sampling kernel no longer reads x1 (128 bytes a pixel; the grad wpack GEMM still does)
        assert after["fwd"]["dram_floor_bytes"] >= before["fwd"]["dram_floor_bytes"] + 448, (before, after)
        assert after["bwd"]["dram_floor_bytes"] >= before["bwd"]["dram_floor_bytes"] + 300, (before, after)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_grad_wpack_accumulates_in_the_backward(emu, dtype):
    """Where their fp32 partials fit beside the backward's tiles (InternImage-T stages 1-2 in 16-bit types, stage 1
    in fp32), grad wpack and grad bpack accumulate in the sampling kernel's persistent CTAs, each taking every
    slots-th tile, and a small launch sums the CTAs' partials in order: grad logits never reach HBM and no GEMM
    reads them back. The gradients match the GEMM path (cuda.wpack_in_backward(False)) up to fp32 summation order,
    whether one CTA takes every tile, several take a few each, or each takes one; a given slot count gives the
    same bits in every thread order. Case: 18 tiles, edge tiles with pixels outside the image.

    By default it runs only where its partials' traffic, with a CTA per tile up to one per SM, is at most half of
    the bytes it saves (grad logits written and read back, x1 read again): on 4 full tiles at C = 32 in fp32 (4
    bytes an element), not in bf16, nor on this case's 18 tiles of 798 pixels."""
    case = CASES[-1]
    value, x1, params, geom, grad_out = make_inputs(case)
    args = rounded(value, x1, params, dtype)
    with cuda.wpack_in_backward(False, device="cpu"), emulation.count() as launches:
        gemm = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
    assert [x["kernel"] for x in launches] == ["dcn_fwd_out", "gemm", "dcn_bwd_x1", "gemm"]
    with cuda.wpack_in_backward(False, device="cpu"), cuda.wpack_slots(4, device="cpu"):
        forced = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
    assert torch.equal(forced[3], gemm[3])  # the switch wins over the slots
    assert emulation.extension().wpack_in_backward()  # restored
    tiles = case.n * -(-case.h // 8) * -(-case.w // 8)
    full = Case("full-tiles", n=1, h=16, w=16, c=32, group=2)
    for decided, shape in ((False, case), (dtype == torch.float32, full)):
        cols, elem = cuda.packed_cols(shape.group), torch.finfo(dtype).bits // 8
        shape_tiles = shape.n * -(-shape.h // 8) * -(-shape.w // 8)
        pixels = shape.n * shape.h * shape.w
        assert (
            4 * min(shape_tiles, 132) * cols * (shape.c + 1) * 4 <= pixels * (2 * cols + shape.c) * elem
        ) == decided
        inputs = make_inputs(shape)
        with emulation.count() as launches:
            run_block(cuda.dcnv3_fused_emu, *rounded(*inputs[:3], dtype), *inputs[3:])
        assert ("sum_slots" in [x["kernel"] for x in launches]) == decided, shape.name
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]  # the GEMM path rounds the same sums to bf16
    for slots in (1, 4, tiles):
        with cuda.wpack_slots(slots, device="cpu"):
            with emulation.count() as launches:
                fused = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
            with emulation.thread_order("shuffle", 5):
                shuffled = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
        assert [x["kernel"] for x in launches] == [
            "dcn_fwd_out",
            "gemm",
            "dcn_bwd_x1",
            "sum_slots",
        ]
        assert launches[2]["grid"][0] == slots
        for name, a, b, c in zip(NAMES, fused, gemm, shuffled, strict=False):
            assert torch.equal(a, c), name
            if name in ("offset_w", "offset_b", "mask_w", "mask_b"):
                assert relative_l2(a, b.double()) < tol, (slots, name, relative_l2(a, b.double()))
            else:  # grad wpack alone changed its path
                assert torch.equal(a, b), name
    assert emulation.extension().wpack_slots() == 0  # restored
    with pytest.raises(RuntimeError, match="automatic"):
        emulation.extension().set_wpack_slots(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_grad_wpack_accumulates_in_thread_block_clusters(emu, dtype):
    """Where one CTA cannot hold grad wpack's partial (InternImage-T stage 3, -H stage 1), a cluster of up to 8
    (sm_90) can: each CTA takes one tile per round and, between two cluster barriers, adds its slice of the
    partial's rows from every tile of the round, reading the other CTAs' grad logits from their shared memory. Forced
    here on a shape one CTA could hold: with one cluster, every row sums the same tiles in the same order as one CTA
    does, so the gradients are bitwise those of one CTA at any cluster size (an odd one too, whose last slice is
    short); with two clusters they match the GEMM path up to fp32 order; every thread order (the threads of a
    cluster's CTAs interleaved) gives the same bits. Only the clusters read another CTA's shared memory."""
    case = CASES[-1]
    value, x1, params, geom, grad_out = make_inputs(case)
    args = rounded(value, x1, params, dtype)
    with cuda.wpack_in_backward(False, device="cpu"):
        gemm = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
    with cuda.wpack_slots(1, device="cpu"), cuda.wpack_cluster(1, device="cpu"):
        one_cta = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for cluster, slots in ((2, 1), (3, 1), (8, 1), (3, 2)):
        with cuda.wpack_slots(slots, device="cpu"), cuda.wpack_cluster(cluster, device="cpu"):
            with emulation.count() as launches:
                fused = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
            with emulation.thread_order("shuffle", 7):
                shuffled = run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
        assert [x["kernel"] for x in launches] == ["dcn_fwd_out", "gemm", "dcn_bwd_x1", "sum_slots"]
        assert launches[2]["grid"][0] == slots * cluster
        assert launches[2]["dsmem_bytes"] > 0 and all(
            x["dsmem_bytes"] == 0 for i, x in enumerate(launches) if i != 2
        )
        for name, a, b, c, d in zip(NAMES, fused, gemm, shuffled, one_cta, strict=False):
            assert torch.equal(a, c), (cluster, name)
            if slots == 1:
                assert torch.equal(a, d), (cluster, name)
            if name in ("offset_w", "offset_b", "mask_w", "mask_b"):
                assert relative_l2(a, b.double()) < tol, (cluster, name, relative_l2(a, b.double()))
            else:
                assert torch.equal(a, b), (cluster, name)
    ext = emulation.extension()
    assert ext.wpack_cluster() == 0  # restored
    with pytest.raises(RuntimeError, match="1 to 8"):
        ext.set_wpack_cluster(9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fused_block_with_grad_wpack_in_the_backward_matches_float64(emu, case, dtype):
    """Every case and dtype again, with grad wpack accumulated in 2 persistent CTAs wherever its partials fit (all
    of these shapes but Cg 16 with G = 8 in fp32)."""
    with cuda.wpack_slots(2, device="cpu"):
        check_block(cuda.dcnv3_fused_emu, case, dtype)


def test_grad_wpack_stays_a_gemm_where_its_partials_do_not_fit(emu):
    """InternImage-T stage 2's shape (Cg 16, G = 8, C = 128) in fp32: one CTA's partial (224 x 129 floats) does not
    fit beside the backward's tiles, so without clusters (a GPU below sm_90: wpack_cluster(1) here) grad wpack is
    the GEMM over stored grad logits even when forced, and with them the automatic choice is a cluster of 4 (a
    quarter of the rows each, and a copy of another CTA's columns); in bf16 one CTA holds it (with 1.2 KiB of 227 to spare). The binding's query agrees, and puts
    InternImage-T stage 3 and -H stage 1 (bf16) in clusters of 8, T stage 4 and H stage 2 beyond any."""
    case = CASES[3]
    assert (case.c, case.group) == (128, 8)
    ext = emulation.extension()
    for dtype, cluster in ((torch.float32, 4), (torch.bfloat16, 1), (torch.float16, 1)):
        like = torch.empty(0, dtype=dtype)
        assert [k for k in (1, 2, 4, 8) if ext.bwd_wpack_fits(like, case.group, case.c, k)][0] == cluster
        value, x1, params, geom, grad_out = make_inputs(case)
        args = rounded(value, x1, params, dtype)
        with (
            cuda.wpack_slots(2, device="cpu"),
            cuda.wpack_cluster(1, device="cpu"),
            emulation.count() as launches,
        ):
            run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
        assert ("sum_slots" in [x["kernel"] for x in launches]) == (cluster == 1), (dtype, launches)
        with cuda.wpack_slots(2, device="cpu"), emulation.count() as launches:
            run_block(cuda.dcnv3_fused_emu, *args, geom, grad_out)
        tiles = case.n * -(-case.h // 8) * -(-case.w // 8)
        assert [x["kernel"] for x in launches][-1] == "sum_slots"
        assert (
            launches[2]["grid"][0] == min(2, -(-tiles // cluster)) * cluster
        )  # slots: at most one per cluster of tiles
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    for groups, channels, smallest in (
        (16, 256, 8),
        (10, 320, 8),
        (32, 512, None),
        (20, 640, None),
    ):  # T3 H1 T4 H2
        fitting = [k for k in (1, 2, 4, 8) if ext.bwd_wpack_fits(bf16, groups, channels, k)]
        assert fitting[:1] == ([smallest] if smallest else []), (groups, channels, fitting)
    # the emulation holds as many clusters as an H200's 132 SMs take (a GPU answers from its occupancy calculator)
    assert ext.wpack_clusters_resident(bf16, 16, 256, 8) == 16


def test_forward_falls_back_to_two_launches_when_the_y_tile_does_not_fit(emu):
    """fp32 with C = 640, G = 20: the tile's y (64 x 648 x 4 bytes) and the sampling state exceed 227 KiB of shared
    memory, so the sampling kernel writes y and the GEMM projects it; likewise the backward's grad logits tile of
    all groups, so grad x1 is a GEMM of its own. Results still match float64."""
    case = Case("fp32-wide-fallback", n=1, h=5, w=6, c=640, group=20)
    value, x1, params, geom, grad_out = make_inputs(case)
    args = rounded(value, x1, params, torch.float32)
    with emulation.count() as fwd:
        out = cuda.dcnv3_fused_emu(*args, geom)
    with emulation.count() as bwd:
        out.backward(grad_out.float())
    assert [launch["kernel"] for launch in fwd] == ["dcn_fwd", "gemm"]
    assert [launch["kernel"] for launch in bwd] == ["gemm", "dcn_bwd_value", "gemm", "gemm"]
    check_block(cuda.dcnv3_fused_emu, case, torch.float32)


def test_strided_core_op_takes_two_sampling_launches(emu):
    """Where output and value grids differ (stride 2), grad logits (per output tile) and grad value (per value
    tile, owner-computes) are separate launches."""
    geom = DCNGeometry.make(3, 2, 1, 1, group=4)
    gen = torch.Generator().manual_seed(11)
    value = torch.randn(1, 9, 11, 64, generator=gen, requires_grad=True)
    offset = torch.randn(1, 5, 6, 4 * 2 * 9, generator=gen)
    mask = torch.softmax(torch.randn(1, 5, 6, 4, 9, generator=gen), -1).flatten(3)
    y = cuda.dcnv3_core_emu(value, offset, mask, geom)
    with emulation.count() as launches:
        torch.autograd.grad(y, [value], torch.ones_like(y))
    kernels = [launch["kernel"] for launch in launches]
    assert kernels.count("dcn_bwd") == 1 and kernels.count("dcn_bwd_value") == 1, kernels
    assert sum(launch["atomics"] for launch in launches) <= value.shape[0] * value.shape[3]  # absmax only


# ---------------------------------------------------------------------------------------------------------
# Mutants: a kernel with an injected bug must fail the checks above. Each rebuilds only the units that include
# the patched header (about 20-40 s on 2 cores), cached like the real build.

MUTANTS = {
    # d/dx loses every odd channel of each lane's vector: half the channels missing from the offset gradient.
    "dropped-dx-term": [
        (
            "dcnv3/dcn_kernels.cuh",
            "dx = fmaf(gyc, hy * (c1 - c0)",
            "dx = (v & 1) ? dx : fmaf(gyc, hy * (c1 - c0)",
        )
    ],
    # grad value ignores the recorded reach: each value tile gathers only the source pixels next to it.
    "ignored-reach": [
        (
            "dcnv3/dcn_kernels.cuh",
            "const int r = reach[1 + oty * tiles_w + otx] + 1;",
            "const int r = 1;",
        )
    ],
    # A persistent CTA's grad wpack partial keeps only its last tile's share.
    "overwritten-wpack-partial": [
        (
            "dcnv3/dcn_kernels.cuh",
            "wpart[(m0 + r - j0) * p.C + c0 + c] += ",
            "wpart[(m0 + r - j0) * p.C + c0 + c] = ",
        )
    ],
    # A cluster's CTAs read each other's grad logits without waiting for them to be complete.
    "missing-cluster-barrier": [
        ("dcnv3/dcn_kernels.cuh", "if (cluster > 1) cluster_sync();  // every CTA's grad logits tile", "//")
    ],
    # The touch masks leave out a sample's right-hand corners: the backward skips pixels that do scatter there.
    "narrow-touch-mask": [
        ("dcnv3/dcn_kernels.cuh", "floor_div(x0 + 2, kTile) - tile_x", "floor_div(x0, kTile) - tile_x")
    ],
    # The fixed-point accumulator's low words never carry into the high ones: they overflow.
    "dropped-carry": [("dcnv3/dcn_kernels.cuh", "    if (l > kFixedLowMask) {", "    if (false) {")],
    # The barrier between normalising the logits (softmax/sigmoid) and sampling with them.
    "missing-barrier": [
        (
            "dcnv3/dcn_kernels.cuh",
            "    if (p.has_cfs) row[3 * p.P] = 1.f / (1.f + __expf(-row[3 * p.P]));\n  }\n  __syncthreads();\n",
            "    if (p.has_cfs) row[3 * p.P] = 1.f / (1.f + __expf(-row[3 * p.P]));\n  }\n",
        )
    ],
}


# Run in a fresh interpreter: a process can import one build of the extension module only (same module name).
_MUTANT_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
from kernel_cases import check_block
from test_kernel_emu import CASES, CONCENTRATED_TOL, _block, concentrated_grad_error
from pretrain.ops import DCNGeometry, cuda, emulation
with emulation.using(emulation.load({lib!r})) as ext:
    try:
        for case in CASES[:2] + CASES[-1:]:
            check_block(cuda.dcnv3_fused_emu, case, torch.float32)
        with cuda.wpack_slots(3, device="cpu"):  # persistent CTAs that take several tiles each
            check_block(cuda.dcnv3_fused_emu, CASES[-1], torch.float32)
        with cuda.wpack_slots(2, device="cpu"), cuda.wpack_cluster(3, device="cpu"):  # and in clusters
            check_block(cuda.dcnv3_fused_emu, CASES[-1], torch.float32)
        err = concentrated_grad_error()
        assert err < CONCENTRATED_TOL, f"concentrated samples: grad value error {{err:.3g}}"
    except AssertionError as err:
        print("REJECTED:", str(err).splitlines()[0])
    first = _block(CASES[1], torch.float32)
    with emulation.thread_order("reverse", ext=ext):
        again = _block(CASES[1], torch.float32)
    print("ORDER-DEPENDENT" if not all(torch.equal(a, b) for a, b in zip(first, again)) else "ORDER-INDEPENDENT")
"""


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_the_suite_rejects_a_broken_kernel(emu, name):
    import subprocess
    import sys
    from pathlib import Path

    patches: dict[str, list[tuple[str, str]]] = {}
    for path, old, new in MUTANTS[name]:
        patches.setdefault(path, []).append((old, new))
    lib = emulation.build(patches=patches)
    assert lib != emulation.built_library()
    code = _MUTANT_RUN.format(tests=str(Path(__file__).parent), lib=str(lib))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "REJECTED: " in res.stdout, f"the checks accepted the {name} mutant:\n{res.stdout}"
    if name == "missing-barrier":  # the race detector sees it too
        assert "ORDER-DEPENDENT" in res.stdout, res.stdout
    else:
        assert "ORDER-INDEPENDENT" in res.stdout, res.stdout


def test_tolerances_are_tight_enough_to_see_a_zero_gradient():
    """The pass rule itself: an all-zero gradient is relative error 1, far above every bound."""
    assert max(TOL.values()) < 0.05


def test_self_check_accepts_the_kernels_and_rejects_a_wrong_one(emu, monkeypatch):
    """The check the CUDA extension runs when it loads (a failure keeps `auto` on the reference), here on the
    same kernels in the emulation, and on a kernel 1% off."""
    real = cuda._fused_call
    monkeypatch.setattr(cuda, "_fused_call", lambda v, x, p, g: real(v, x, p, g, emulate=True))
    assert cuda.self_check(device="cpu") is None
    monkeypatch.setattr(cuda, "_fused_call", lambda v, x, p, g: real(v, x, p, g, emulate=True) * 1.01)
    assert "relative error" in cuda.self_check(device="cpu")


def test_self_check_inside_a_checkpointed_forward_under_no_grad(emu, monkeypatch):
    """The self-check runs where the kernels are first asked for: inside a checkpointed block (its saved tensors
    must not count as the block's, or the recompute, which has no self-check, fails: seen on an H200) and under
    no_grad (an EMA teacher's first forward: it must still run autograd, not fail and disable the kernels)."""
    real = cuda._fused_call
    monkeypatch.setattr(cuda, "_fused_call", lambda v, x, p, g: real(v, x, p, g, emulate=True))
    with torch.no_grad():
        assert cuda.self_check(device="cpu") is None
    with torch.inference_mode():
        assert cuda.self_check(device="cpu") is None
    first_call = [True]

    def block(x):
        if first_call[0]:  # the extension loads once: the recompute does not check again
            first_call[0] = False
            assert cuda.self_check(device="cpu") is None
        return x.sin() * 2

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum().backward()
    assert torch.allclose(x.grad, 2 * x.detach().cos())


def test_parameters_as_views_at_odd_offsets_give_the_same_bits(emu):
    """DeepSpeed flattens parameters into one buffer, so each is a view at an arbitrary offset (an H200 run stopped
    on `bout must be 16-byte aligned`): the op copies what the kernels' 16-byte loads cannot take."""
    case = CASES[1]
    value, x1, params, geom, grad_out = make_inputs(case)
    value, x1, params = rounded(value, x1, params, torch.bfloat16)
    first = run_block(cuda.dcnv3_fused_emu, value, x1, params, geom, grad_out)
    fields = {k: t for k, t in vars(params).items() if t is not None}
    flat = torch.zeros(1 + sum(t.numel() + 1 for t in fields.values()), dtype=torch.bfloat16)
    views, at = {}, 1  # every view starts 2 bytes (plus whole elements) past an aligned start
    for k, t in fields.items():
        views[k] = flat[at : at + t.numel()].view_as(t)
        views[k].copy_(t.detach())
        at += t.numel() + 1
    assert any(v.data_ptr() % 16 for v in views.values())
    odd = type(params)(**{k: views.get(k) for k in vars(params)})
    for t in views.values():
        t.requires_grad_()
    again = run_block(cuda.dcnv3_fused_emu, value, x1, odd, geom, grad_out)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_bench_dcn_emulate_writes_the_counter_table(emu, tmp_path):
    """`pretrain bench dcn --emulate` (the table in BENCHMARKS.md) on a tiny stage: every column filled."""
    from pretrain.cli import main

    out = tmp_path / "counters.md"
    args = [
        "bench",
        "dcn",
        "--emulate",
        "--models",
        "t",
        "--stages",
        "1",
        "--image-size",
        "32",
        "--rows",
        "2",
    ]
    assert main([*args, "--dtypes", "bf16", "--out", str(out), "--marginal", "--by-line", "3"]) == 0
    lines = [line for line in out.read_text().splitlines() if line.startswith("| T | 1 |")]
    assert len(lines) == 3 and "| 1x2x8x64 | 4 | fwd | 1 |" in lines[0] and "| fwd+bwd |" in lines[1]
    assert "| fwd, no grad | 1 |" in lines[2]
    cells = lines[1].split("|")
    # L2 bytes, atomics, shared loads, shared stores, mma, shared atomics, shared and atomic bank passes
    assert all(float(cells[i]) > 0 for i in (8, 11, 13, 14, 15, 17, 18, 19))
    assert float(cells[18]) >= float(cells[19])
    # Marginal DRAM floor per pixel (slice doubled): at least the activations' essential bytes, 8 x 64 x 2.
    assert len(cells) == 23 and float(cells[20]) >= 8 * 64 * 2 and float(cells[21]) >= 1.0
    # --by-line: the stage's 3 heaviest source lines by L2 bytes and by bank passes, each a line of the kernel
    # sources (or the emulation's ldmatrix).
    text = out.read_text()
    assert "T stage 1 (1x2x8x64): the source lines that move the most L2 bytes" in text
    assert "T stage 1 (1x2x8x64): the source lines that take the most shared-memory bank passes" in text
    heavy = [line for line in text.splitlines() if line.startswith(("| fwd ", "| bwd "))]
    assert len(heavy) == 6 and all(".cuh:" in line or "ldmatrix" in line for line in heavy), heavy
    # A kernel variant (the first --impls entry) is counted under its switch, and named in the title and command.
    assert main([*args, "--out", str(out), "--impls", "kernel-no-masks,reference", "--offset-std", "2"]) == 0
    text = out.read_text()
    assert "224 px" not in text and "32 px, offsets N(0, 2^2) px, kernel-no-masks)" in text
    assert "--offset-std 2 --impls kernel-no-masks`" in text
    assert emulation.extension().halo_masks()  # restored


def test_offset_spread_sets_the_backward_halo(emu):
    """`bench dcn --offset-std`: offsets spread wider make the backward recompute a wider halo of source pixels
    (more tensor-core work, as counted), and 0 is a freshly initialised block: its offset projection is zero."""
    from pretrain.bench.blocks import make_block
    from pretrain.bench.dcn_counters import count_block, summarise

    _, _, params, _ = make_block(1, 4, 4, 64, 4, False, torch.float32, "cpu", offset_std=0.0)
    assert not params.offset_weight.any() and not params.offset_bias.any()
    shape = (1, 24, 24, 64, 4, False, torch.bfloat16)
    mma = {std: summarise(count_block(*shape, offset_std=std)["bwd"], 24 * 24)["mma"] for std in (0.0, 3.0)}
    assert mma[3.0] > 1.5 * mma[0.0], mma


def test_shared_memory_starts_poisoned_in_every_cta(emu):
    """Each CTA starts with its shared memory filled with 0xFF (NaN), like uninitialised shared memory (the suite's
    finite-output checks then see any read of an element before its write). Dynamic shared memory: the pad columns
    of a GEMM staging tile, which no thread writes, still hold the poison after the launch. Static __shared__ (the
    strided backward's dcn_bwd): written during its launch, and poisoned again by the next launch's CTAs."""
    import ctypes

    emu.linear_fwd(torch.randn(64, 32), torch.randn(64, 32), None)
    # GemmSmem<float, 64, 64>: staging a (2 cp.async slots of 64 x 40), b (2 slots); the result tile over them.
    # K = 32 is one K-step: slot 0 of each.
    dynamic = emu.emu_last_dynamic_smem()
    last_b_row = dynamic[2 * 64 * 40 * 4 + 63 * 40 * 4 :][: 40 * 4]  # beyond the 64 x 68 result tile
    assert last_b_row[32 * 4 :] == b"\xff" * 32 and last_b_row[: 32 * 4] != b"\xff" * 128

    geom = DCNGeometry.make(3, 2, 1, 1, group=2)
    value = torch.randn(1, 9, 11, 32, requires_grad=True)
    offset, mask = torch.randn(1, 5, 6, 2 * 2 * 9), torch.softmax(torch.randn(1, 5, 6, 2, 9), -1).flatten(3)
    y = cuda.dcnv3_core_emu(value, offset, mask, geom)
    with emulation.count() as launches:
        torch.autograd.grad(y, [value], torch.ones_like(y))
    assert [launch["kernel"] for launch in launches][-2:] == ["dcn_bwd", "dcn_bwd_value"]
    assert launches[-2]["shared_store_bytes"] >= 64 * 64 * 4  # dcn_bwd wrote its logits tile
    lib = ctypes.CDLL(str(emulation.built_library()))
    static = (ctypes.c_uint8 * (2 * 64 * 40 * 4 + 64 * 68 * 4)).in_dll(  # DcnSmem<float>
        lib, "_ZZN5dcnv314dcn_bwd_kernelIfLi16EEEvNS_9DcnParamsEE2sm"
    )
    assert bytes(static) == b"\xff" * len(static)


_SANITIZED_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
from kernel_cases import DTYPES, check_block, check_core
from test_kernel_emu import CASES
from pretrain.ops import DCNGeometry, cuda, emulation
emulation.build(verbose=False)
for case in CASES:
    for dtype in DTYPES:
        check_block(cuda.dcnv3_fused_emu, case, dtype)
with cuda.fused_epilogues(False, device="cpu"):  # the split forms: dcn_fwd + GEMM, dcn_bwd_value + GEMM
    for case in CASES[:2]:
        for dtype in (torch.float32, torch.bfloat16):
            check_block(cuda.dcnv3_fused_emu, case, dtype)
with cuda.backward_threads(256, device="cpu"):  # the 8-warp backward
    for case in CASES[:2]:
        check_block(cuda.dcnv3_fused_emu, case, torch.bfloat16)
with cuda.wpack_slots(3, device="cpu"):  # grad wpack in persistent CTAs, several tiles each
    for case in (CASES[0], CASES[-1]):
        for dtype in (torch.float32, torch.bfloat16):
            check_block(cuda.dcnv3_fused_emu, case, dtype)
with cuda.stored_grad_y(True, device="cpu"), cuda.stored_logits(True, device="cpu"):  # the stored-state forms
    for case in CASES[:2]:
        check_block(cuda.dcnv3_fused_emu, case, torch.bfloat16)
with cuda.wpack_slots(2, device="cpu"), cuda.wpack_cluster(3, device="cpu"):  # and in clusters of 3 CTAs
    for dtype in (torch.float32, torch.bfloat16):
        check_block(cuda.dcnv3_fused_emu, CASES[-1], dtype)
for dtype in DTYPES:
    check_core(cuda.dcnv3_core_emu, dtype, 2)
print("CLEAN")
"""

# One build under both: signed overflow, out-of-range shifts, misaligned accesses, invalid casts (UBSan, abort on the
# first report), and out-of-bounds reads and writes of the kernels in torch's tensors and in their own stacks
# (ASan). At -O1, ASan's recommended level: GCC instruments CUTLASS-heavy units at -O2 2-3x more slowly (the ASan
# build alone took 15.7 min of CPU at -O2, the UBSan one more; this one 10 min, measured 2026-12-02).
SANITIZER_FLAGS = "-O1 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"


def test_kernels_are_clean_under_sanitizers(emu):
    """The whole block, every case (and its split-epilogue, 8-warp, stored-state and in-kernel grad wpack forms on
    two, grad wpack in clusters on one), and the strided core op in an emulation build under ASan and UBSan (in a fresh
    interpreter: ASan's runtime must be preloaded). A kernel reading one vector past a tensor, or a signed overflow
    in the fixed-point scale, was reported when injected."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0", emulation.EXTRA_FLAGS_ENV: SANITIZER_FLAGS}
    runtime = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout
    env["LD_PRELOAD"] = runtime.strip()
    code = _SANITIZED_RUN.format(tests=str(Path(__file__).parent))
    # The timeout covers the sanitized build too (minutes on 2 cores when its cache is cold and the CI's nvcc check
    # compiles beside it).
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0 and "CLEAN" in res.stdout, (res.stdout + res.stderr)[-4000:]
