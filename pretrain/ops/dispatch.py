"""Backend registry for the DCNv3 op.

Two entry points, each with a reference implementation and optional accelerated ones:

* `core`:  `fn(value, offset, mask, geom) -> out`, the aggregation alone (the official op's boundary).
* `fused`: `fn(value, x1, params: FusedParams, geom) -> out`, the DCN block's hot path after
  `input_proj` and the depthwise branch: offset/mask projection, softmax, aggregation,
  center-feature-scale blend and `output_proj` (the CUDA kernel's boundary, see csrc/).

`backend="auto"` takes the first available accelerated backend that supports the tensors, else the
reference; naming a backend that is not available is a single-line `BackendUnavailable` error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class BackendUnavailable(RuntimeError):
    """The requested DCNv3 backend cannot run here; the message says why and how to fix it."""


@dataclass
class Backend:
    name: str
    core: Callable | None = None
    fused: Callable | None = None
    # -> None when usable for these tensors, else a one-line reason.
    unavailable_reason: Callable[[torch.Tensor], str | None] = field(default=lambda t: None)
    priority: int = 0  # higher is tried first by "auto"
    explicit_only: bool = (
        False  # never picked by "auto" nor listed as available (e.g. the CPU kernel emulation)
    )


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends(example: torch.Tensor | None = None) -> list[str]:
    """Backend names usable for tensors like `example` (any device when None is given)."""
    probe = example if example is not None else torch.empty(0)
    return [b.name for b in _BACKENDS.values() if not b.explicit_only and b.unavailable_reason(probe) is None]


def resolve(name: str, tensor: torch.Tensor, entry: str) -> Callable:
    """The implementation of `entry` ("core" or "fused") for backend `name` on `tensor`'s device."""
    if name == "auto":
        for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
            if not b.explicit_only and getattr(b, entry) is not None and b.unavailable_reason(tensor) is None:
                return getattr(b, entry)
        raise BackendUnavailable("no DCNv3 backend registered (pretrain.ops failed to import its reference?)")
    if name not in _BACKENDS:
        raise BackendUnavailable(
            f"unknown DCNv3 backend {name!r}; choose one of {['auto', *sorted(_BACKENDS)]}"
        )
    backend = _BACKENDS[name]
    reason = backend.unavailable_reason(tensor)
    if reason is not None:
        raise BackendUnavailable(f"DCNv3 backend {name!r} is not available: {reason}")
    fn = getattr(backend, entry)
    if fn is None:
        raise BackendUnavailable(f"DCNv3 backend {name!r} has no {entry!r} implementation")
    return fn
