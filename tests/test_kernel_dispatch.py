"""The cuda DCNv3 backend without a GPU: registration, one-line reasons, `auto` choosing the reference, clean
fallback for unsupported shapes, the custom ops' fake (meta) implementations, and the autograd plumbing of
the custom ops run through their CPU kernels (the kernel's packed-logit contract evaluated with the reference).
"""

from __future__ import annotations

import pytest
import torch

from pretrain.ops import (
    BackendUnavailable,
    DCNGeometry,
    FusedParams,
    available_backends,
    build,
    cuda,
    dcnv3_core,
    dcnv3_core_reference,
    dcnv3_fused,
    dcnv3_fused_reference,
    dispatch,
)


def _inputs(n=2, h=5, w=7, c=32, group=2, geom=None, cfs=True, dtype=torch.float64):
    geom = geom or DCNGeometry.make(3, 1, 1, 1, group=group)
    g, p = geom.group, geom.points

    def t(*shape, scale=0.5):
        return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()

    params = FusedParams(
        t(g * p * 2, c),
        t(g * p * 2),
        t(g * p, c),
        t(g * p),
        t(c, c),
        t(c),
        t(g, c) if cfs else None,
        t(g) if cfs else None,
    )
    return t(n, h, w, c), t(n, h, w, c), params, geom


def _leaves(value, x1, params):
    return [value, x1, *(v for v in vars(params).values() if v is not None)]


def test_backend_registered_with_reasons():
    assert "cuda" in dispatch._BACKENDS and "cuda-emu" in dispatch._BACKENDS
    reason = cuda.unavailable_reason(torch.empty(2))
    assert reason is not None and "CUDA tensors only" in reason and "\n" not in reason
    assert available_backends() == ["reference"]


def test_not_built_reason_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PRETRAIN_DCNV3_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_ext_error", None)
    assert build.built_library() is None
    reason = cuda.extension_error()
    assert "python -m pretrain.ops.build" in reason and "\n" not in reason


def test_broken_build_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("PRETRAIN_DCNV3_BUILD_DIR", str(tmp_path))
    (tmp_path / f"{build.EXT_NAME}.so").write_bytes(b"not a shared object")
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_ext_error", None)
    assert "failed to load" in cuda.extension_error()


def test_dtype_reason_on_a_fake_cuda_tensor(monkeypatch):
    class T:  # what unavailable_reason reads of a tensor
        device = torch.device("cuda", 0)
        dtype = torch.float64

    assert "float64" in cuda.unavailable_reason(T())


def test_auto_uses_reference_on_cpu():
    value, x1, params, geom = _inputs()
    assert dispatch.resolve("auto", value, "fused") is dcnv3_fused_reference
    assert dispatch.resolve("auto", value, "core") is dcnv3_core_reference
    torch.testing.assert_close(
        dcnv3_fused(value, x1, params, geom), dcnv3_fused_reference(value, x1, params, geom)
    )


def test_explicit_cuda_on_cpu_is_a_one_line_error():
    value, x1, params, geom = _inputs()
    with pytest.raises(BackendUnavailable, match="CUDA tensors only") as err:
        dcnv3_fused(value, x1, params, geom, backend="cuda")
    assert "\n" not in str(err.value)
    with pytest.raises(BackendUnavailable):
        dcnv3_core(value, value, value, geom, backend="cuda")


@pytest.mark.parametrize(
    "c, group, kernel, stride, pad, needle",
    [
        (64, 8, 3, 1, 1, "channels per group 8"),
        (96, 2, 3, 1, 1, "channels per group 48"),
        (32, 2, 5, 1, 2, "sampling points"),
        (32, 2, 3, 2, 1, "output size == input size"),
    ],
)
def test_unsupported_shapes_have_reasons(c, group, kernel, stride, pad, needle):
    geom = DCNGeometry.make(kernel, stride, pad, 1, group=group)
    value = torch.zeros(1, 8, 8, c)
    assert needle in cuda.unsupported_reason(value, geom, x1=value)


def test_supported_shapes():
    for c, group in ((64, 4), (64, 2), (320, 10), (2560, 80), (896, 56)):
        geom = DCNGeometry.make(3, 1, 1, 1, group=group)
        assert cuda.unsupported_reason(torch.zeros(1, 7, 7, c), geom, x1=torch.zeros(1)) is None
    assert (
        cuda.unsupported_reason(
            torch.zeros(1, 7, 7, 64), DCNGeometry.make(3, 1, 1, 1, group=4, remove_center=True)
        )
        is None
    )


def test_unsupported_falls_back_to_reference_with_warning(monkeypatch):
    monkeypatch.setattr(
        cuda, "unavailable_reason", lambda t: None
    )  # pretend a built extension and CUDA tensor
    monkeypatch.setattr(cuda, "_warned", set())
    value, x1, params, geom = _inputs(c=64, group=8)  # Cg = 8: no kernel
    with pytest.warns(UserWarning, match="channels per group 8.*using the reference"):
        out = cuda.dcnv3_fused_cuda(value, x1, params, geom)
    torch.testing.assert_close(out, dcnv3_fused_reference(value, x1, params, geom))


@pytest.mark.parametrize("group", [2, 3])
def test_pack_projection_layout(group):
    """28 rows per group (offsets, masks, cfs, zeros), rows padded to a multiple of 8 (odd G: 4 zero rows)."""
    _, _, params, geom = _inputs(c=16 * group, group=group)
    w, b = cuda.pack_projection(params, geom, torch.float64)
    p, rows = geom.points, cuda.packed_cols(group)
    assert rows == -(-group * 28 // 8) * 8 and rows % 8 == 0
    assert w.shape == (rows, 16 * group) and b.shape == (rows,)
    for g in range(group):
        row = g * 28
        torch.testing.assert_close(w[row : row + 2 * p], params.offset_weight[g * 2 * p : (g + 1) * 2 * p])
        torch.testing.assert_close(w[row + 2 * p : row + 3 * p], params.mask_weight[g * p : (g + 1) * p])
        torch.testing.assert_close(w[row + 3 * p], params.cfs_weight[g])
        assert not w[row + 3 * p + 1 : row + 28].any() and not b[row + 3 * p + 1 : row + 28].any()
    assert not w[group * 28 :].any() and not b[group * 28 :].any()


@pytest.mark.parametrize(
    "geom_kw, cfs",
    [
        (dict(group=2), True),
        (dict(group=2), False),
        (dict(group=4, offset_scale=2.0), True),
        (dict(group=2, remove_center=True), False),
        (dict(group=2, dilation=2, pad=2), True),
    ],
)
def test_custom_op_plumbing_matches_reference(geom_kw, cfs):
    """The fused op's packing, custom-op forward and registered backward give the reference's values and
    every gradient (value, x1, all weights and biases) in float64 through the ops' CPU kernels."""
    geom = DCNGeometry.make(3, 1, geom_kw.pop("pad", 1), geom_kw.pop("dilation", 1), **geom_kw)
    value, x1, params, geom = _inputs(c=64 if geom.group == 4 else 32, group=geom.group, geom=geom, cfs=cfs)
    ref = dcnv3_fused_reference(value, x1, params, geom)
    out = cuda._fused_call(value, x1, params, geom)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    leaves = _leaves(value, x1, params)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_core_op_plumbing_matches_reference():
    geom = DCNGeometry.make(3, 2, 1, 1, group=2, offset_scale=1.5)
    value = torch.randn(2, 9, 8, 32, dtype=torch.float64, requires_grad=True)
    ho, wo = geom.output_size(9, 8)
    offset = torch.randn(2, ho, wo, 2 * 2 * 9, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, ho, wo, 2 * 9, dtype=torch.float64, requires_grad=True)
    ref = dcnv3_core_reference(value, offset, mask, geom)
    out = cuda._core_call(value, offset, mask, geom)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad(out, (value, offset, mask), grad),
        torch.autograd.grad(ref, (value, offset, mask), grad),
    ):
        torch.testing.assert_close(a, b)


def test_fake_impls_give_shapes_on_meta():
    geom = DCNGeometry.make(3, 1, 1, 1, group=4)
    gl = cuda.geometry_list(geom)
    with torch.device("meta"):
        v = torch.empty(3, 7, 9, 64, dtype=torch.bfloat16)
        wp, bp, wo, bo = torch.empty(128, 64), torch.empty(128), torch.empty(64, 64), torch.empty(64)
        out, y, reach, logits = cuda.fused_fwd(v, v, wp, bp, wo, bo, gl, 1.0, True, False, True)
        assert out.shape == (3, 7, 9, 64) and y.shape == v.shape and out.dtype == torch.bfloat16
        # 7x9 pixels: 1x2 tiles of 8x8, then a uint16 touch mask per pixel and group pair (2 pairs): 63 int32 words
        assert reach.shape == (3, 1 + 1 * 2 + 63) and reach.dtype == torch.int32
        assert logits.numel() == 0 and logits.dtype == torch.float32  # stored only with cuda.stored_logits
        grads = cuda.fused_bwd(out, v, v, wp, bp, wo, y, reach, logits, gl, 1.0, True, False)
        assert [g.shape for g in grads] == [v.shape, v.shape, wp.shape, bp.shape, wo.shape, bo.shape]
        y, reach = cuda.core_fwd(v, torch.empty(3, 4, 5, 128), 4, 5, gl, 1.0, False)
        assert y.shape == (3, 4, 5, 64) and reach.shape == (3, 1 + 1 + 20)
        logits = torch.empty(3, 4, 5, 128)
        gv, glog = cuda.core_bwd(torch.empty(3, 4, 5, 64), v, logits, reach, 4, 5, gl, 1.0, False)
        assert gv.shape == v.shape and glog.shape == (3, 4, 5, 128)


def test_fake_impls_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    geom = DCNGeometry.make(3, 1, 1, 1, group=2)
    with FakeTensorMode():
        v = torch.empty(2, 5, 6, 32)
        out, y, *_ = cuda.fused_fwd(
            v,
            v,
            torch.empty(64, 32),
            torch.empty(64),
            torch.empty(32, 32),
            torch.empty(32),
            cuda.geometry_list(geom),
            1.0,
            False,
            False,
            True,
        )
        assert out.shape == (2, 5, 6, 32) and y.shape == (2, 5, 6, 32)


@pytest.mark.parametrize("op", ["fused", "core"])
def test_opcheck(op):
    """torch.library.opcheck: schema, fake impl vs real (CPU kernel) and autograd registration agree."""
    value, x1, params, geom = _inputs(n=1, h=3, w=4, c=32, group=2)
    wp, bp = cuda.pack_projection(params, geom, torch.float64)
    args = (
        value.detach(),
        x1.detach(),
        wp.detach(),
        bp.detach(),
        params.output_weight.detach(),
        params.output_bias.detach(),
        cuda.geometry_list(geom),
        1.0,
        True,
        False,
        True,
    )
    torch.library.opcheck(
        cuda.fused_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )


def test_torch_compile_traces_the_fused_op_in_one_graph():
    """The wrapper (packing + custom op + registered backward) compiles with fullgraph=True (aot_eager)."""
    value, x1, params, geom = _inputs(n=1, h=3, w=4, c=32, group=2, dtype=torch.float32)
    fn = torch.compile(lambda v, x, p: cuda._fused_call(v, x, p, geom), backend="aot_eager", fullgraph=True)
    out = fn(value, x1, params)
    torch.testing.assert_close(out, dcnv3_fused_reference(value, x1, params, geom), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert value.grad is not None and params.offset_weight.grad is not None


def test_gpu_tests_fail_instead_of_skipping_when_the_extension_is_broken(monkeypatch):
    """On a CUDA machine a failed build must turn the GPU tests red, never into skips with exit 0."""
    from kernel_cases import require_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pytest.skip.Exception):
        require_kernels()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "extension_error", lambda: "the DCNv3 CUDA extension is not built")
    with pytest.raises(pytest.fail.Exception, match="not built"):
        require_kernels()
