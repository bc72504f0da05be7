"""Where the kernel sources and the toolchain pieces they build with are (shared by the CUDA build and the
CPU emulation build)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def csrc_dir() -> Path:
    """csrc/dcnv3 of this checkout (the sources are not shipped inside the wheel)."""
    path = Path(os.environ.get("PRETRAIN_CSRC", Path(__file__).resolve().parents[2] / "csrc")) / "dcnv3"
    if not (path / "binding.cpp").exists():
        raise FileNotFoundError(
            f"DCNv3 CUDA sources not found at {path}; set PRETRAIN_CSRC to the repo's csrc/"
        )
    return path


def cutlass_include() -> Path | None:
    """CUTLASS/CuTe headers: $CUTLASS_HOME/include, else the `nvidia-cutlass` pip package, else None."""
    home = os.environ.get("CUTLASS_HOME")
    candidates = [Path(home) / "include"] if home else []
    try:
        import cutlass_library  # the pip package `nvidia-cutlass` ships the headers next to it

        candidates.append(Path(cutlass_library.__file__).parent / "source" / "include")
    except ImportError:
        pass
    for c in candidates:
        if (c / "cute" / "tensor.hpp").exists():
            return c
    return None


def nvcc() -> str | None:
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )


def cuda_include() -> Path | None:
    """The CUDA toolkit's include dir (cuda_runtime.h), for host-only compile checks of the binding."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc() is not None:
        roots.append(str(Path(nvcc()).resolve().parents[1]))
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


def cuobjdump() -> str | None:
    """cuobjdump (reads the SASS of compiled kernels; it runs nvdisasm, which must sit beside it or on PATH): on
    PATH, beside nvcc, else from the `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` pip packages (test extras:
    the compile check reads the kernels' instructions with them). None when either is missing."""
    candidates = [shutil.which("cuobjdump")]
    if nvcc() is not None:
        candidates.append(str(Path(nvcc()).resolve().parent / "cuobjdump"))
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels

        candidates += [str(t) for root in nvidia.__path__ for t in sorted(Path(root).glob("*/bin/cuobjdump"))]
    except ImportError:
        pass
    for tool in filter(None, candidates):
        if Path(tool).exists() and ((Path(tool).parent / "nvdisasm").exists() or shutil.which("nvdisasm")):
            return tool
    return None
