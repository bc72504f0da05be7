"""The "cuda" DCNv3 backend: autograd over the fused kernels of csrc/dcnv3 (optional extension).

Importing this module never builds or needs CUDA: it registers the backend, and the extension is imported
lazily from the directory `python -m pretrain.ops.build` writes to. Until that explicit build step has run on
a GPU machine, `unavailable_reason` says so and `backend="auto"` keeps using the reference op.

Kernel boundary (see csrc/dcnv3/dcn_kernels.cuh): the offset/mask(/center-feature-scale) projections are packed
into one weight `wpack` (L, C): per group 28 rows (2P offset rows, P mask rows, 1 cfs row, zero padding), L = G*28
padded to a multiple of 8 (`packed_cols`). The sampling kernel computes those logits on chip, then softmax,
aggregation and the cfs blend, and (where the tile's y fits in shared memory) the output projection as its
epilogue; y is stored only for grad wout. Packing is done here with differentiable torch ops, so autograd maps
grad(wpack) back onto the module's own offset/mask/cfs parameters.

Ops (torch.library.custom_op, with fake implementations so torch.compile can trace them):
    internimage_dcnv3::fused_fwd(value, x1, wpack, bpack, wout, bout, geom, offset_scale, has_cfs, emulate, save_y)
        -> (out, y (empty unless save_y), reach, logits (fp32, empty unless save_y and stored_logits))
    internimage_dcnv3::fused_bwd(grad_out, value, x1, wpack, bpack, wout, y, reach, logits, geom, ..., emulate)
        -> 6 grads
    internimage_dcnv3::core_fwd(value, logits, ho, wo, geom, offset_scale, emulate) -> (y, reach)
    internimage_dcnv3::core_bwd(grad_y, value, logits, reach, ho, wo, geom, offset_scale, emulate)
        -> (grad_value, grad_logits)
`reach` (int32, per image and 8x8 output tile: how far the samples land from their pixel) is recorded by the
forward kernel so that the backward's grad value kernel knows which pixels can scatter into each value tile.
Each has a CUDA kernel (the extension) and a CPU kernel. On CPU tensors `emulate=True` runs the same kernels and
binding in the CPU emulation (pretrain/ops/emulation.py; the `cuda-emu` backend, for tests and counters), and
`emulate=False` evaluates the packed contract with the reference op (to test this module's plumbing, in float64
too). Neither is for speed: `auto` never routes CPU work here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.machinery
import importlib.util
import warnings

import torch
import torch.nn.functional as F

from . import emulation
from .alignment import aligned16
from .fused import FusedParams, dcnv3_fused_reference
from .geometry import DCNGeometry
from .reference import dcnv3_core_reference

GROUP_COLS = 28  # packed logit columns per group (csrc/dcnv3/params.h: kGroupCols)


def packed_cols(groups: int) -> int:
    """Row length of the packed logits: G blocks of GROUP_COLS, padded to whole 16-byte vectors (params.h)."""
    return -(-groups * GROUP_COLS // 8) * 8


CHANNELS_PER_GROUP = (16, 32)  # compiled kernel variants (csrc/dcnv3/launch.h)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BUILD_COMMAND = "python -m pretrain.ops.build"

_ext = None
_ext_error: str | None = None


def extension():
    """The built extension module, or None (with `extension_error()` saying why). Never compiles."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    try:
        from .build import EXT_NAME, built_library

        lib = built_library()
        if lib is None:
            _ext_error = (
                f"the DCNv3 CUDA extension is not built: run `{BUILD_COMMAND}` on a machine with CUDA"
            )
            return None
        loader = importlib.machinery.ExtensionFileLoader(EXT_NAME, str(lib))
        spec = importlib.util.spec_from_file_location(EXT_NAME, str(lib), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except Exception as err:  # a stale or foreign build: say which and how to rebuild
        _ext_error = (
            f"the DCNv3 CUDA extension failed to load ({type(err).__name__}: {err}); rerun `{BUILD_COMMAND}`"
        )
        return None
    if torch.cuda.is_available():
        _ext = module  # the self-check runs the ops, which ask for the extension
        failure = self_check()
        if failure is not None:
            _ext = None
            _ext_error = (
                f"the DCNv3 CUDA kernels failed their self-check on this GPU ({failure}); using the reference"
            )
    return _ext


def self_check(device="cuda") -> str | None:
    """Run the fused block forward + backward on a small case in fp32 and bf16 against the float64 reference.

    -> None, or what went wrong. A build whose kernels error out or compute wrong values on this GPU (a new
    architecture, a driver or toolchain issue) must never be picked by `backend="auto"`.

    It runs where the kernels are first asked for, often inside a model's forward: it needs autograd whatever the
    caller's grad mode (the first call may come under no_grad, as an EMA teacher's does), and its saved tensors must
    stay its own (inside activation checkpointing, they were counted as the block's, and the recompute, which has no
    self-check, failed with a CheckpointError on an H200).
    """
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)  # the innermost pair wins
    with torch.inference_mode(False), torch.enable_grad(), hooks:
        return _self_check(device)


def _self_check(device: str) -> str | None:
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
    gen = torch.Generator().manual_seed(0)
    geom = DCNGeometry.make(3, 1, 1, 1, group=2)
    c, g, p = 64, 2, geom.points

    def r(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    # Samples kept off bilinear cell edges, where the offset gradient jumps (tests/kernel_cases.make_inputs).
    cells = torch.randint(-3, 4, (g * p * 2,), generator=gen).double() + 0.5
    tensors = [r(1, 9, 11, c), r(1, 9, 11, c), r(g * p * 2, c, std=0.0125 / c**0.5), cells, r(g * p, c, std=0.1),
               r(g * p), r(c, c, std=0.1), r(c), r(g, c, std=0.1), r(g)]  # fmt: skip
    grad = r(1, 9, 11, c)

    def run(fn, leaves):
        out = fn(leaves[0], leaves[1], FusedParams(*leaves[2:]), geom)
        grads = torch.autograd.grad(out, leaves, grad.to(out.device, out.dtype))
        return [t.detach().double().cpu() for t in (out, *grads)]

    for dtype, tol in tolerance.items():
        # The oracle runs in float64 on the same rounded inputs: input rounding is not the kernel's error.
        rounded = [t.to(dtype) for t in tensors]
        exact = run(dcnv3_fused_reference, [t.double().requires_grad_() for t in rounded])
        try:
            kernel = run(_fused_call, [t.to(device).requires_grad_() for t in rounded])
        except Exception as err:
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        for i, (k, e) in enumerate(zip(kernel, exact)):
            err = ((k - e).norm() / e.norm().clamp_min(1e-30)).item()
            if not err <= tol:  # NaN fails too
                return f"{dtype} output {i}: relative error {err:.3g} > {tol:g}"
    return None


def extension_error() -> str | None:
    extension()
    return _ext_error


def unavailable_reason(t: torch.Tensor) -> str | None:
    """None when the cuda backend can take tensors like `t`, else one actionable line."""
    if t.device.type != "cuda":
        return f"tensor is on {t.device.type}, the cuda backend runs on CUDA tensors only"
    if t.dtype not in DTYPES:
        return f"dtype {t.dtype} is not supported by the cuda backend (float32, float16, bfloat16)"
    return extension_error()


def emulation_unavailable_reason(t: torch.Tensor) -> str | None:
    """None when the `cuda-emu` backend (the kernels in the CPU emulation) can take tensors like `t`."""
    if t.device.type != "cpu":
        return f"tensor is on {t.device.type}, the kernel emulation runs on CPU tensors only"
    if t.dtype not in DTYPES:
        return f"dtype {t.dtype} is not supported by the kernels (float32, float16, bfloat16)"
    return emulation.error()


def _kernels(t: torch.Tensor):
    """The extension that runs the kernels for `t`: the CUDA build, or the emulation build for CPU tensors."""
    return extension() if t.device.type == "cuda" else emulation.extension()


def geometry_list(geom: DCNGeometry) -> list[int]:
    """[kh, kw, sh, sw, ph, pw, dh, dw, group, remove_center], the binding's geometry argument."""
    return [*geom.kernel, *geom.stride, *geom.pad, *geom.dilation, geom.group, int(geom.remove_center)]


def unsupported_reason(value: torch.Tensor, geom: DCNGeometry, x1: torch.Tensor | None = None) -> str | None:
    """Shape/geometry limits of the compiled kernels (None when supported); callers fall back to the reference."""
    if value.dim() != 4:
        return "value must be (N, H, W, C)"
    c = value.shape[-1]
    if c % geom.group or c // geom.group not in CHANNELS_PER_GROUP:
        return f"channels per group {c / geom.group:g} has no compiled kernel (have {CHANNELS_PER_GROUP})"
    if 3 * geom.points + 1 > GROUP_COLS:
        return f"{geom.points} sampling points per group exceed the kernel's {(GROUP_COLS - 1) // 3} (3x3 kernels)"
    if x1 is not None and geom.output_size(value.shape[1], value.shape[2]) != tuple(value.shape[1:3]):
        return (
            "the fused op needs output size == input size (offsets are projected from x1 at input resolution)"
        )
    return None


_warned: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"DCNv3 cuda backend: {reason}; using the reference op", stacklevel=3)


# ----------------------------------------------------------------------------------------------------------
# Packing (differentiable): module parameters -> the kernel's per-group 28-column logit layout.


def _pack_groups(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x (..., G, k, *trail) with G at `dim`: each group's k entries padded to GROUP_COLS, the groups flattened and
    the result padded to packed_cols(G) (zeros everywhere else)."""
    g, k, trail = x.shape[dim], x.shape[dim + 1], x.dim() - dim - 2
    x = F.pad(x, (0, 0) * trail + (0, GROUP_COLS - k)).flatten(dim, dim + 1)
    return F.pad(x, (0, 0) * trail + (0, packed_cols(g) - g * GROUP_COLS)).contiguous()


def pack_projection(
    params: FusedParams, geom: DCNGeometry, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(wpack (L, C), bpack (L,)) in `dtype` from the offset/mask/cfs projections, L = packed_cols(G)."""
    g, p = geom.group, geom.points
    c = params.offset_weight.shape[-1]
    ws = [params.offset_weight.view(g, 2 * p, c), params.mask_weight.view(g, p, c)]
    bs = [params.offset_bias.view(g, 2 * p), params.mask_bias.view(g, p)]
    if params.cfs_weight is not None:
        ws.append(params.cfs_weight.view(g, 1, c))
        bs.append(params.cfs_bias.view(g, 1))
    w = torch.cat([t.to(dtype) for t in ws], dim=1)
    b = torch.cat([t.to(dtype) for t in bs], dim=1)
    return _pack_groups(w, 0), _pack_groups(b, 0)


def pack_logits(
    offset: torch.Tensor, mask: torch.Tensor, geom: DCNGeometry, dtype: torch.dtype
) -> torch.Tensor:
    """(N, Ho, Wo, L) packed logits from offset (N,Ho,Wo,G*2P) and (normalised) mask (N,Ho,Wo,G*P)."""
    n, ho, wo, _ = offset.shape
    g, p = geom.group, geom.points
    packed = torch.cat(
        [offset.to(dtype).view(n, ho, wo, g, 2 * p), mask.to(dtype).view(n, ho, wo, g, p)], dim=-1
    )
    return _pack_groups(packed, 3)


def _geom_from_list(geom: list[int], offset_scale: float) -> DCNGeometry:
    kh, kw, sh, sw, ph, pw, dh, dw, group, remove_center = geom
    return DCNGeometry.make((kh, kw), (sh, sw), (ph, pw), (dh, dw), group, offset_scale, bool(remove_center))


def sample_reference(
    value: torch.Tensor, logits: torch.Tensor, geom: DCNGeometry, apply_softmax: bool, has_cfs: bool
) -> torch.Tensor:
    """The sampling kernel's contract in torch ops: packed logits (N,Ho,Wo,L) -> y (N,Ho,Wo,C)."""
    n, ho, wo, _ = logits.shape
    g, p = geom.group, geom.points
    lg = logits[..., : g * GROUP_COLS].reshape(n, ho, wo, g, GROUP_COLS)
    offset = lg[..., : 2 * p].reshape(n, ho, wo, g * 2 * p)
    mask = lg[..., 2 * p : 3 * p]
    if apply_softmax:
        mask = F.softmax(mask, dim=-1)
    y = dcnv3_core_reference(value, offset, mask.reshape(n, ho, wo, g * p), geom)
    if has_cfs:
        s = torch.sigmoid(lg[..., 3 * p]).repeat_interleave(value.shape[-1] // g, dim=-1)
        y = y * (1 - s) + value * s
    return y


# ----------------------------------------------------------------------------------------------------------
# Custom ops. CUDA kernels call the extension; CPU kernels evaluate the same contract with the reference.

_LIB = "internimage_dcnv3"


def _like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor shaped like `t` (the kernels' outputs are always contiguous)."""
    return t.new_empty(t.shape)


def _reach_like(value: torch.Tensor, ho: int, wo: int, groups: int) -> torch.Tensor:
    """The forward's reach output: (N, reach_row) int32, per image the largest distance from a sampling base to a
    bilinear corner, the same per 8x8 output tile, then a uint16 touch mask per output pixel and group pair (which
    nearby value tiles its samples can reach; csrc/dcnv3/params.h). The backward's grad value kernel uses them to
    find the source pixels of each value tile; the CPU contract path leaves them zero."""
    tiles = -(-ho // 8) * -(-wo // 8)
    touch_words = -(-(ho * wo * -(-groups // 2)) // 2)
    return value.new_zeros((value.shape[0], 1 + tiles + touch_words), dtype=torch.int32)


@torch.library.custom_op(f"{_LIB}::fused_fwd", mutates_args=())
def fused_fwd(
    value: torch.Tensor,
    x1: torch.Tensor,
    wpack: torch.Tensor,
    bpack: torch.Tensor,
    wout: torch.Tensor,
    bout: torch.Tensor,
    geom: list[int],
    offset_scale: float,
    has_cfs: bool,
    emulate: bool,
    save_y: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out (N,H,W,Cout), y (N,H,W,C) the blended aggregate, saved for grad wout (an empty tensor unless
    save_y: inference needs no y), reach for the backward, the fp32 logits for the backward (N,H,W,packed_cols(G);
    an empty tensor unless save_y and stored_logits is on))."""
    if emulate:
        return _fused_fwd_cuda(
            value, x1, wpack, bpack, wout, bout, geom, offset_scale, has_cfs, emulate, save_y
        )
    g = _geom_from_list(geom, offset_scale)
    logits = F.linear(x1, wpack, bpack)
    y = sample_reference(value, logits, g, True, has_cfs)
    reach = _reach_like(value, *value.shape[1:3], geom[8])
    return F.linear(y, wout, bout).contiguous(), _y_output(y.contiguous(), save_y), reach, _no_logits(value)


def _no_logits(value: torch.Tensor) -> torch.Tensor:
    return value.new_empty(0, dtype=torch.float32)


def _y_output(y: torch.Tensor, save_y: bool) -> torch.Tensor:
    return y if save_y else y.new_empty(0)


@fused_fwd.register_kernel("cuda")
def _fused_fwd_cuda(value, x1, wpack, bpack, wout, bout, geom, offset_scale, has_cfs, emulate, save_y):
    # One launch where the tile's y fits on chip: the output projection is the sampling kernel's epilogue.
    out, y, reach, logits = _kernels(value).block_fwd(
        value, x1, wpack, bpack, wout, bout, geom, offset_scale, has_cfs, save_y
    )
    return out, y, reach, logits


@fused_fwd.register_fake
def _fused_fwd_fake(value, x1, wpack, bpack, wout, bout, geom, offset_scale, has_cfs, emulate, save_y):
    out = value.new_empty((*value.shape[:3], wout.shape[0]))
    # The logits are stored where the kernels run (not the CPU reference) and their switch is on (stored_logits).
    logits = _no_logits(value)
    if save_y and (emulate or value.device.type != "cpu"):
        ext = emulation.extension() if emulate else extension()
        if ext is not None and ext.stored_logits():
            logits = value.new_empty((*value.shape[:3], packed_cols(geom[8])), dtype=torch.float32)
    return out, _y_output(_like(value), save_y), _reach_like(value, *value.shape[1:3], geom[8]), logits


@torch.library.custom_op(f"{_LIB}::fused_bwd", mutates_args=())
def fused_bwd(
    grad_out: torch.Tensor,
    value: torch.Tensor,
    x1: torch.Tensor,
    wpack: torch.Tensor,
    bpack: torch.Tensor,
    wout: torch.Tensor,
    y: torch.Tensor,
    reach: torch.Tensor,
    logits: torch.Tensor,
    geom: list[int],
    offset_scale: float,
    has_cfs: bool,
    emulate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grads of (value, x1, wpack, bpack, wout, bout). logits: the forward's stored ones, or empty."""
    if emulate:
        return _fused_bwd_cuda(
            grad_out, value, x1, wpack, bpack, wout, y, reach, logits, geom, offset_scale, has_cfs, emulate
        )
    g = _geom_from_list(geom, offset_scale)
    # Custom-op kernels run below the autograd dispatch key: torch.func builds its own graph there.
    _, vjp = torch.func.vjp(
        lambda v, x, wp, bp: sample_reference(v, F.linear(x, wp, bp), g, True, has_cfs),
        value,
        x1,
        wpack,
        bpack,
    )
    grads = vjp(F.linear(grad_out, wout.t()))
    flat = grad_out.reshape(-1, grad_out.shape[-1])
    grads = tuple(g.contiguous() for g in grads)
    return (*grads, (flat.t() @ y.reshape(-1, y.shape[-1])).contiguous(), flat.sum(0))


@fused_bwd.register_kernel("cuda")
def _fused_bwd_cuda(
    grad_out, value, x1, wpack, bpack, wout, y, reach, logits, geom, offset_scale, has_cfs, emulate
):
    # grad wout first (its GEMM also takes max |grad_out| per image, bounding grad_y for the fixed-point scales),
    # then one sampling launch that recomputes grad_y per tile from grad_out, with grad x1 as its epilogue (where
    # it fits), then grad wpack/bpack: a GEMM over the stored grad logits, or (where the partials fit on chip) the
    # sum of the sampling launch's per-CTA partials.
    grads = _kernels(value).block_bwd(
        grad_out, value, x1, wpack, bpack, wout, y, reach, logits, geom, offset_scale, has_cfs
    )
    return tuple(grads)


@fused_bwd.register_fake
def _fused_bwd_fake(
    grad_out, value, x1, wpack, bpack, wout, y, reach, logits, geom, offset_scale, has_cfs, emulate
):
    return (
        _like(value),
        _like(x1),
        _like(wpack),
        _like(bpack),
        _like(wout),
        wout.new_empty(wout.shape[0]),
    )


def _fused_setup(ctx, inputs, output):
    value, x1, wpack, bpack, wout, bout, geom, offset_scale, has_cfs, emulate, _save_y = inputs
    ctx.save_for_backward(value, x1, wpack, bpack, wout, output[1], output[2], output[3])
    ctx.geom, ctx.offset_scale, ctx.has_cfs, ctx.emulate = geom, offset_scale, has_cfs, emulate
    # y, reach and logits are internal outputs (kept for the backward) that the public wrapper never returns:
    # without this, autograd would allocate and zero-fill a gradient of y's size for every call (128 MB per block at
    # H stage 1).
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_out, _grad_y, _grad_reach, _grad_logits):
    value, x1, wpack, bpack, wout, y, reach, logits = ctx.saved_tensors
    if grad_out is None:  # `out` did not reach the loss
        return (None,) * 11
    grads = fused_bwd(
        aligned16(grad_out),
        value,
        x1,
        wpack,
        bpack,
        wout,
        y,
        reach,
        logits,
        ctx.geom,
        ctx.offset_scale,
        ctx.has_cfs,
        ctx.emulate,
    )
    return (*grads, None, None, None, None, None)


fused_fwd.register_autograd(_fused_backward, setup_context=_fused_setup)


@torch.library.custom_op(f"{_LIB}::core_fwd", mutates_args=())
def core_fwd(
    value: torch.Tensor,
    logits: torch.Tensor,
    ho: int,
    wo: int,
    geom: list[int],
    offset_scale: float,
    emulate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DCNv3 aggregation from packed (offset, normalised mask) logits -> (y (N, Ho, Wo, C), reach)."""
    if emulate:
        return _core_fwd_cuda(value, logits, ho, wo, geom, offset_scale, emulate)
    y = sample_reference(value, logits, _geom_from_list(geom, offset_scale), False, False).contiguous()
    return y, _reach_like(value, ho, wo, geom[8])


@core_fwd.register_kernel("cuda")
def _core_fwd_cuda(value, logits, ho, wo, geom, offset_scale, emulate):
    y, reach = _kernels(value).sample_fwd(
        value, None, None, None, logits, ho, wo, geom, offset_scale, False, False
    )
    return y, reach


@core_fwd.register_fake
def _core_fwd_fake(value, logits, ho, wo, geom, offset_scale, emulate):
    return value.new_empty((value.shape[0], ho, wo, value.shape[3])), _reach_like(value, ho, wo, geom[8])


@torch.library.custom_op(f"{_LIB}::core_bwd", mutates_args=())
def core_bwd(
    grad_y: torch.Tensor,
    value: torch.Tensor,
    logits: torch.Tensor,
    reach: torch.Tensor,
    ho: int,
    wo: int,
    geom: list[int],
    offset_scale: float,
    emulate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_value, grad_logits); grad_y in value's dtype, reach core_fwd's."""
    if emulate:
        return _core_bwd_cuda(grad_y, value, logits, reach, ho, wo, geom, offset_scale, emulate)
    g = _geom_from_list(geom, offset_scale)
    y, vjp = torch.func.vjp(lambda v, lg: sample_reference(v, lg, g, False, False), value, logits)
    return tuple(g.contiguous() for g in vjp(grad_y.to(y.dtype)))


@core_bwd.register_kernel("cuda")
def _core_bwd_cuda(grad_y, value, logits, reach, ho, wo, geom, offset_scale, emulate):
    gv, gl = _kernels(value).sample_bwd(
        grad_y, value, None, None, None, logits, ho, wo, geom, offset_scale, False, False, reach
    )
    return gv, gl


@core_bwd.register_fake
def _core_bwd_fake(grad_y, value, logits, reach, ho, wo, geom, offset_scale, emulate):
    return _like(value), _like(logits)


def _core_setup(ctx, inputs, output):
    value, logits, ho, wo, geom, offset_scale, emulate = inputs
    ctx.save_for_backward(value, logits, output[1])
    ctx.args = (ho, wo, geom, offset_scale, emulate)
    ctx.set_materialize_grads(False)  # reach is internal


def _core_backward(ctx, grad_y, _grad_reach):
    value, logits, reach = ctx.saved_tensors
    if grad_y is None:
        return (None,) * 7
    grad_y = aligned16(grad_y.to(value.dtype))  # the kernels take grad_y in the activations' dtype
    gv, gl = core_bwd(grad_y, value, logits, reach, *ctx.args)
    return gv, gl, None, None, None, None, None


core_fwd.register_autograd(_core_backward, setup_context=_core_setup)


@contextlib.contextmanager
def _extension_switch(name: str, value, device: str):
    """Within the block, the extension's setting `name` (its getter `name`, setter `set_<name>`) is `value`, then
    what it was. device "cpu": the emulation build's setting."""
    ext = extension() if device == "cuda" else emulation.extension()
    if ext is None:
        raise RuntimeError(extension_error() if device == "cuda" else emulation.error())
    before = getattr(ext, name)()
    getattr(ext, f"set_{name}")(value)
    try:
        yield
    finally:
        getattr(ext, f"set_{name}")(before)


def fused_epilogues(enabled: bool, device: str = "cuda"):
    """Within the block, run the output projection (forward) and grad x1 (backward) fused into the sampling kernels
    where their tiles fit (enabled, the default) or as GEMMs of their own: the same results, different occupancy
    (`pretrain bench dcn` times both). device "cpu": the emulation build's switch."""
    return _extension_switch("fused_epilogues", enabled, device)


def backward_threads(threads: int, device: str = "cuda"):
    """Within the block, run the one-launch backward (stride 1, same padding) with `threads` per CTA: 128 (4 warps,
    the default) or 256 (8 warps, two per scheduler where one CTA fills an SM): the same results, different latency
    hiding (`pretrain bench dcn` times both). device "cpu": the emulation build's switch."""
    return _extension_switch("backward_threads", threads, device)


def halo_masks(enabled: bool, device: str = "cuda"):
    """Within the block, let the one-launch backward (stride 1, same padding) skip the halo pixels whose touch masks
    -- which nearby value tiles each pixel's samples can reach, recorded by the forward -- rule the CTA's tile out
    (enabled, the default), or recompute logits and grad_y for every pixel within the tile reach's rectangles: the
    same results (a skipped pixel adds nothing), different tensor-core work (`pretrain bench dcn` times both, impl
    kernel-no-masks). device "cpu": the emulation build's switch."""
    return _extension_switch("halo_masks", enabled, device)


def stored_grad_y(enabled: bool, device: str = "cuda"):
    """Within the block, compute the backward's grad_y = grad_out . W_out once in a GEMM launch and let the sampling
    backward read it (enabled), or recompute it per chunk of each CTA's own tile and halo (the default): the same
    results, 2 C more HBM bytes per pixel (grad_y written and read back) against the halo's grad_y GEMMs, tensor-core
    work (`pretrain bench dcn` times both, impl kernel-stored-grad-y). device "cpu": the emulation build's switch."""
    return _extension_switch("stored_grad_y", enabled, device)


def stored_logits(enabled: bool, device: str = "cuda"):
    """Within the block, let the forward store its fp32 logits (x1 . wpack^T + bpack) beside y when training, and the
    backward read them (enabled), or recompute them per chunk of each CTA's own tile and halo (the default): the
    same results, packed_cols(G) floats a pixel written and read back (3.5 C bytes at 16 channels a group, 1.75 C at
    32) against the backward's logits GEMMs, tensor-core work (`pretrain bench dcn` times both, impl
    kernel-stored-logits). The forward decides: a forward run with it on gives its backward the stored logits.
    device "cpu": the emulation build's switch."""
    return _extension_switch("stored_logits", enabled, device)


def wpack_in_backward(enabled: bool, device: str = "cuda"):
    """Within the block, accumulate grad wpack and grad bpack in the backward's sampling kernel where their fp32
    partials fit beside its tiles and the batch is large enough for one persistent CTA per SM to pay (enabled, the
    default: grad logits never reach HBM; InternImage-T stages 1-2, and in clusters of 8 CTAs on sm_90 T stage 3
    and H stage 1), or always store grad logits and reduce them in
    a GEMM launch: the same gradients up to fp32 summation order (`pretrain bench dcn` times both, impl
    kernel-wpack-gemm). device "cpu": the emulation build's switch."""
    return _extension_switch("wpack_in_backward", enabled, device)


def wpack_slots(slots: int, device: str = "cuda"):
    """Within the block, run the in-kernel grad wpack wherever its partials fit, in `slots` persistent CTAs (at most
    one per tile; or clusters of CTAs, see wpack_cluster), each taking every slots-th tile and summing its own
    partial; 0: the automatic choice (one per SM or per 8 SMs, where the batch is large enough). For tests and for
    counting a large batch's per-pixel bytes at a fixed number of partials."""
    return _extension_switch("wpack_slots", slots, device)


def wpack_cluster(cluster: int, device: str = "cuda"):
    """Within the block, run the in-kernel grad wpack in thread-block clusters of `cluster` CTAs (1 to 8; 1: none),
    each CTA holding a slice of the partial's rows and reading the cluster's other grad logits tiles from their
    shared memory (sm_90), wherever that slice fits; 0: the automatic choice (the smallest of 1, 2, 4, 8 that fits:
    InternImage-T stage 3 and -H stage 1 take 8). For tests (clusters where one CTA would do) and the bench."""
    return _extension_switch("wpack_cluster", cluster, device)


# ----------------------------------------------------------------------------------------------------------
# Backend entry points (the dispatch contract of pretrain/ops/dispatch.py).


def _fused_call(
    value: torch.Tensor, x1: torch.Tensor, params: FusedParams, geom: DCNGeometry, emulate: bool = False
) -> torch.Tensor:
    """The op path without availability checks (emulate=False on CPU: the plumbing with the reference)."""
    dtype = value.dtype
    wpack, bpack = pack_projection(params, geom, dtype)
    # y is kept for grad wout only when a gradient can flow (not under no_grad/inference_mode).
    save_y = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (value, x1, *(getattr(params, f.name) for f in dataclasses.fields(params)))
    )
    out, *_ = fused_fwd(
        aligned16(value),
        aligned16(x1.to(dtype)),
        wpack,
        bpack,
        aligned16(params.output_weight.to(dtype)),
        aligned16(params.output_bias.to(dtype)),
        geometry_list(geom),
        float(geom.offset_scale),
        params.cfs_weight is not None,
        emulate,
        save_y,
    )
    return out


def _core_call(
    value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geom: DCNGeometry, emulate: bool = False
) -> torch.Tensor:
    geom.check(value, offset, mask)
    _, ho, wo, _ = offset.shape
    logits = pack_logits(offset, mask, geom, value.dtype)
    y, _ = core_fwd(aligned16(value), logits, ho, wo, geometry_list(geom), float(geom.offset_scale), emulate)
    return y


def dcnv3_fused_cuda(
    value: torch.Tensor, x1: torch.Tensor, params: FusedParams, geom: DCNGeometry
) -> torch.Tensor:
    """`dcnv3_fused` on the CUDA kernels; unsupported shapes fall back to the reference with a warning."""
    reason = unavailable_reason(value) or unsupported_reason(value, geom, x1)
    if reason is not None:
        _fallback(reason)
        return dcnv3_fused_reference(value, x1, params, geom)
    return _fused_call(value, x1, params, geom)


def dcnv3_core_cuda(
    value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geom: DCNGeometry
) -> torch.Tensor:
    """`dcnv3_core` on the CUDA kernel; unsupported shapes fall back to the reference with a warning."""
    reason = unavailable_reason(value) or unsupported_reason(value, geom)
    if reason is not None:
        _fallback(reason)
        return dcnv3_core_reference(value, offset, mask, geom)
    return _core_call(value, offset, mask, geom)


def dcnv3_fused_emu(
    value: torch.Tensor, x1: torch.Tensor, params: FusedParams, geom: DCNGeometry
) -> torch.Tensor:
    """`dcnv3_fused` on the CUDA kernels run in the CPU emulation (tests, counters); unsupported shapes are an
    error here, not a fallback: whoever asks for the emulation wants the kernels."""
    reason = emulation_unavailable_reason(value) or unsupported_reason(value, geom, x1)
    if reason is not None:
        raise ValueError(f"DCNv3 cuda-emu backend: {reason}")
    return _fused_call(value, x1, params, geom, emulate=True)


def dcnv3_core_emu(
    value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geom: DCNGeometry
) -> torch.Tensor:
    """`dcnv3_core` on the CUDA kernel run in the CPU emulation."""
    reason = emulation_unavailable_reason(value) or unsupported_reason(value, geom)
    if reason is not None:
        raise ValueError(f"DCNv3 cuda-emu backend: {reason}")
    return _core_call(value, offset, mask, geom, emulate=True)
