"""The DCN block inputs the kernel benchmarks run on (timed on a GPU by `bench dcn`, counted in the emulation by
`bench dcn --emulate`), and the switch of the kernel variant they run."""

from __future__ import annotations


def make_block(n, h, w, c, group, cfs, dtype, device, offset_std=1.0):
    """Random DCN block inputs (value, x1, FusedParams, geometry), requiring grad, in `dtype` on `device`.

    The sampling offsets come out about N(0, offset_std^2) pixels (x1 is N(0, 1); the offset projection's weight
    has std offset_std / sqrt(C)). Their spread sets how far samples land from their pixel, so how much halo the
    backward recomputes: 0 is a freshly initialised block (InternImage zero-initialises the offset projection), 1
    the default."""
    import torch

    from pretrain.ops import DCNGeometry, FusedParams

    geom = DCNGeometry.make(3, 1, 1, 1, group=group)
    p = geom.points

    def r(*shape, std=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * std).to(dtype).requires_grad_()

    params = FusedParams(
        r(group * p * 2, c, std=offset_std / c**0.5),
        r(group * p * 2, std=0.1 * offset_std),
        r(group * p, c, std=1 / c**0.5),
        r(group * p, std=0.1),
        r(c, c, std=1 / c**0.5),
        r(c, std=0.1),
        r(group, c, std=1 / c**0.5) if cfs else None,
        r(group, std=0.1) if cfs else None,
    )
    return r(n, h, w, c), r(n, h, w, c), params, geom


def kernel_variant(impl, device: str = "cuda"):
    """The kernel variants' switch, for the whole forward and backward: kernel-split, the block's epilogues as GEMMs
    of their own; kernel-8w, the backward's sampling kernel in 8 warps; kernel-wpack-gemm, grad wpack by a GEMM;
    kernel-no-masks, the backward's halo without the touch masks; kernel-stored-grad-y, grad_y by a GEMM, stored and
    read by the backward instead of recomputed there; kernel-stored-logits, the forward's logits stored for the
    backward likewise; kernel-stored-both, both. device "cpu": the emulation's (bench dcn
    --emulate counts the first --impls entry's variant)."""
    import contextlib

    from pretrain.ops import cuda

    if impl == "kernel-split":
        return cuda.fused_epilogues(False, device)
    if impl == "kernel-8w":
        return cuda.backward_threads(256, device)
    if impl == "kernel-wpack-gemm":
        return cuda.wpack_in_backward(False, device)
    if impl == "kernel-no-masks":
        return cuda.halo_masks(False, device)
    if impl == "kernel-stored-grad-y":
        return cuda.stored_grad_y(True, device)
    if impl == "kernel-stored-logits":
        return cuda.stored_logits(True, device)
    if impl == "kernel-stored-both":
        return _together(cuda.stored_grad_y(True, device), cuda.stored_logits(True, device))
    return contextlib.nullcontext()


def _together(*switches):
    """One context of several switches, entered when it is (not when made) and left in reverse order."""
    import contextlib

    @contextlib.contextmanager
    def entered():
        with contextlib.ExitStack() as stack:
            for switch in switches:
                stack.enter_context(switch)
            yield

    return entered()
