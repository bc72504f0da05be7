"""DCNv3 operators: the exact pure-PyTorch reference and a dispatch to accelerated backends.

from pretrain.ops import dcnv3_core, DCNGeometry
geom = DCNGeometry.make(kernel_size=3, stride=1, pad=1, dilation=1, group=4, offset_scale=1.0)
out = dcnv3_core(value, offset, mask, geom, backend="auto")
"""

from __future__ import annotations

import torch

from . import cuda
from .dispatch import Backend, BackendUnavailable, available_backends, register_backend, resolve
from .fused import FusedParams, dcnv3_fused_reference
from .geometry import DCNGeometry
from .reference import dcnv3_core_reference, sampling_locations

# "auto" tries the highest priority first: the CUDA kernels for CUDA tensors once built, else the reference.
# "cuda-emu" (the same kernels in the CPU emulation) is for tests and counters only: auto never picks it.
register_backend(
    Backend(name="reference", core=dcnv3_core_reference, fused=dcnv3_fused_reference, priority=0)
)
register_backend(
    Backend(
        name="cuda",
        core=cuda.dcnv3_core_cuda,
        fused=cuda.dcnv3_fused_cuda,
        unavailable_reason=cuda.unavailable_reason,
        priority=10,
    )
)
register_backend(
    Backend(
        name="cuda-emu",
        core=cuda.dcnv3_core_emu,
        fused=cuda.dcnv3_fused_emu,
        unavailable_reason=cuda.emulation_unavailable_reason,
        explicit_only=True,
    )
)


def dcnv3_core(
    value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geom: DCNGeometry, backend: str = "auto"
) -> torch.Tensor:
    """DCNv3 aggregation (see `reference.py` for the exact semantics and layouts)."""
    return resolve(backend, value, "core")(value, offset, mask, geom)


def dcnv3_fused(
    value: torch.Tensor, x1: torch.Tensor, params: FusedParams, geom: DCNGeometry, backend: str = "auto"
) -> torch.Tensor:
    """The DCN block's hot path from projected value and depthwise branch to `output_proj` (see fused.py)."""
    return resolve(backend, value, "fused")(value, x1, params, geom)


__all__ = [
    "Backend",
    "BackendUnavailable",
    "DCNGeometry",
    "FusedParams",
    "available_backends",
    "dcnv3_core",
    "dcnv3_core_reference",
    "dcnv3_fused",
    "dcnv3_fused_reference",
    "register_backend",
    "sampling_locations",
]
