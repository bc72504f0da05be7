"""Lazy tensors, streaming safetensors output and atomic (temporary name + rename) writes.

Conversion never holds two copies of a model: sources hand out `LazyTensor`s (shape and dtype known
without reading the data; torch files are memory-mapped, safetensors read per tensor, ZeRO partitions
gathered per parameter) and the safetensors writer streams one tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_DTYPES_INV = {v: k for k, v in ST_DTYPES.items()}


class ConvertError(RuntimeError):
    """A checkpoint that cannot be converted or loaded as asked; the message says why and what to do."""


@dataclass
class LazyTensor:
    """A tensor whose data is read only when `load()` is called."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    loader: Callable[[], torch.Tensor]

    def load(self) -> torch.Tensor:
        tensor = self.loader()
        if tuple(tensor.shape) != self.shape:
            raise ConvertError(f"tensor data has shape {tuple(tensor.shape)}, its header says {self.shape}")
        return tensor

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * _itemsize(self.dtype)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> LazyTensor:
        return cls(tuple(tensor.shape), tensor.dtype, lambda: tensor)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def cast_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """The output dtype of a tensor: floating tensors take `target`, integer/bool buffers keep theirs."""
    return target if target is not None and dtype.is_floating_point else dtype


def materialize(lazy: LazyTensor, target: torch.dtype | None) -> torch.Tensor:
    """Load, cast, and give the tensor its own compact storage (a view into a memory-mapped ZeRO flat
    buffer would otherwise drag the whole buffer into a torch.save)."""
    tensor = lazy.load().detach()
    out_dtype = cast_dtype(tensor.dtype, target)
    if out_dtype != tensor.dtype:
        return tensor.to(out_dtype).contiguous()
    if (
        not tensor.is_contiguous()
        or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
    ):
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def write_safetensors(
    path: Path,
    tensors: dict[str, LazyTensor],
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stream `tensors` into a safetensors file, one tensor in memory at a time; returns bytes written.

    Layout (the safetensors spec): u64 little-endian header length, a JSON header naming each tensor's
    dtype, shape and [begin, end) byte range in the data section, padded with spaces to 8 bytes, then data.
    """
    header: dict[str, object] = {}
    offset = 0
    for name, lazy in tensors.items():
        out = cast_dtype(lazy.dtype, dtype)
        if out not in ST_DTYPES:
            raise ConvertError(f"{name}: dtype {out} has no safetensors equivalent")
        size = LazyTensor(lazy.shape, out, lazy.loader).nbytes
        header[name] = {
            "dtype": ST_DTYPES[out],
            "shape": list(lazy.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, lazy in tensors.items():
            tensor = lazy.load().detach()
            tensor = tensor.to(cast_dtype(tensor.dtype, dtype)).contiguous().reshape(-1)
            expected = header[name]["data_offsets"]  # type: ignore[index]
            data = tensor.view(torch.uint8).numpy() if tensor.numel() else b""
            if len(memoryview(data).cast("B")) != expected[1] - expected[0]:
                raise ConvertError(
                    f"{name}: wrote {len(data)} bytes, header promised {expected[1] - expected[0]}"
                )
            f.write(data)
            if progress is not None:
                progress(expected[1] - expected[0])
            del tensor, data
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write (a file or a directory); on success rename it to `dst`.

    On any error the temporary output is removed, so `dst` is either absent, untouched, or complete.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise ConvertError(f"internal error: nothing was written to {tmp}")
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            os.replace(tmp, dst)
        with contextlib.suppress(OSError):
            fd = os.open(dst.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    finally:
        _remove(tmp)
