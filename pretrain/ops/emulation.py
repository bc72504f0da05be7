"""The csrc kernels on a CPU: build and load the emulation extension, set its thread order, read its counters.

    python -m pretrain.ops.emulation            # build (or find in the cache) and print where it is

The unmodified kernels of csrc/dcnv3 and the unmodified binding compile as host C++ with g++ against the small
CUDA shim of csrc/emu (`-DDCNV3_EMULATION`): a CTA's threads run as fibers, `__syncthreads`, warp shuffles and
`mma.sync` are emulated (the latter from the PTX ISA's fragment layouts), and the extension takes CPU tensors.
It is slow (a CPU core runs every thread), exact where the GPU is deterministic, and exists to test the real
kernels without a GPU and to count what they move (`count()`); `backend="cuda-emu"` uses it.

Builds are cached by a hash of everything they depend on (sources, flags, compiler, torch, CUTLASS) under
$PRETRAIN_DCNV3_EMU_DIR (default ~/.cache/internimage_pretrain/dcnv3-emu): objects per translation unit, so a
change to one instantiation unit recompiles only that one. Needs g++, the CUTLASS headers (`nvidia-cutlass`)
and the CUDA toolkit's headers (types like dim3/uint4 and the fp16/bf16 headers CUTLASS includes).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from .build import csrc_dir, cuda_include, cutlass_include

EXT_NAME = "internimage_dcnv3_emu"
# -fno-strict-aliasing: load_vec/store_vec reinterpret a uint4 as the element type (fine in CUDA, UB for g++).
CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-fno-strict-aliasing", "-DDCNV3_EMULATION", "-w")
# The kernel units get ThreadSanitizer's *instrumentation* only: each load/store calls a hook of
# csrc/emu/runtime.cpp (the access counters); no TSan runtime is linked.
KERNEL_FLAGS = ("-fsanitize=thread",)


class EmulationUnavailable(RuntimeError):
    """The emulation extension cannot be built here; the message says what is missing."""


def cache_root() -> Path:
    default = Path.home() / ".cache" / "internimage_pretrain" / "dcnv3-emu"
    return Path(os.environ.get("PRETRAIN_DCNV3_EMU_DIR", default))


def missing_requirement() -> str | None:
    """None when g++, CUTLASS and the CUDA headers are present, else what to install."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "g++ is not installed"
    if cutlass_include() is None:
        return "the CUTLASS headers are missing: `pip install --no-deps nvidia-cutlass==4.2.0.0`"
    if cuda_include() is None:
        return "the CUDA toolkit headers (cuda_runtime_api.h) are missing: install the CUDA toolkit or set CUDA_HOME"
    return None


def _torch_flags() -> tuple[list[str], list[str]]:
    import torch
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cflags = [f"-I{p}" for p in cpp_extension.include_paths()]
    cflags += [
        f"-I{sysconfig.get_paths()['include']}",
        f"-DTORCH_EXTENSION_NAME={EXT_NAME}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
    ]
    lib = cpp_extension.library_paths()[0]
    ldflags = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    return cflags, ldflags


def _tree_digest(root: Path) -> str:
    """Hash of every source and header under root (csrc/): any edit invalidates every object."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.suffix in (".h", ".cuh", ".cu", ".cpp"):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _compiler_id() -> str:
    cxx = os.environ.get("CXX", "g++")
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def _units(root: Path) -> list[tuple[str, Path, list[str]]]:
    """(name, source, unit flags) of every translation unit of the emulation extension."""
    units = [("binding", root / "dcnv3" / "binding.cpp", ["torch"]), ("runtime", root / "emu" / "runtime.cpp", [])]
    for cu in sorted((root / "dcnv3" / "inst").glob("*.cu")):
        units.append((cu.stem, cu, ["kernel"]))
    return units


def _mutated_tree(patches: dict[str, list[tuple[str, str]]], tmp: Path) -> Path:
    """A copy of csrc/ with textual patches applied (mutation tests build deliberately broken kernels)."""
    root = tmp / "csrc"
    shutil.copytree(csrc_dir().parent, root)
    for rel, edits in patches.items():
        path = root / rel
        text = path.read_text()
        for old, new in edits:
            if old not in text:
                raise ValueError(f"patch for {rel}: text not found: {old!r}")
            text = text.replace(old, new)
        path.write_text(text)
    return root


def _build_plan(root: Path):
    """(compile flags, link flags, output library path) of the build of the tree at `root`."""
    import torch

    torch_cflags, ldflags = _torch_flags()
    cuda_inc = cuda_include()
    # CUTLASS includes libcu++ as <cuda/std/...>: CUDA 13 keeps it under include/cccl.
    base = [*CXX_FLAGS, f"-I{cutlass_include()}", f"-I{cuda_inc}", f"-I{cuda_inc / 'cccl'}", f"-I{root / 'dcnv3'}"]
    ident = repr((CXX_FLAGS, KERNEL_FLAGS, _compiler_id(), torch.__version__, _tree_digest(root)))
    ident += (cutlass_include() / "cutlass" / "version.h").read_text()
    key = hashlib.sha256(ident.encode()).hexdigest()[:20]
    return base, torch_cflags, ldflags, cache_root() / key / f"{EXT_NAME}.so"


@functools.lru_cache(maxsize=1)
def library_path() -> Path | None:
    """Where the emulation library of this checkout's sources is (or would be) built; None if it cannot be."""
    if missing_requirement() is not None:
        return None
    return _build_plan(csrc_dir().parent)[-1]


def built_library() -> Path | None:
    """The emulation library of the current sources if it was built, else None (never builds)."""
    lib = library_path()
    return lib if lib is not None and lib.exists() else None


def build(patches: dict[str, list[tuple[str, str]]] | None = None, jobs: int | None = None, verbose=True) -> Path:
    """Compile and link the emulation extension (cached); -> the shared library's path.

    `patches` ({path relative to csrc/: [(old, new), ...]}) builds a mutant in its own cache entry.
    """
    reason = missing_requirement()
    if reason is not None:
        raise EmulationUnavailable(f"cannot build the DCNv3 kernel emulation: {reason}")

    with tempfile.TemporaryDirectory() as tmp:
        root = _mutated_tree(patches, Path(tmp)) if patches else csrc_dir().parent
        base, torch_cflags, ldflags, lib = _build_plan(root)
        out_dir = lib.parent
        if lib.exists():
            return lib
        obj_dir = out_dir / "obj"
        obj_dir.mkdir(parents=True, exist_ok=True)
        cxx = os.environ.get("CXX", "g++")

        def compile_unit(unit):
            name, src, kinds = unit
            flags = list(base)
            if "torch" in kinds:
                flags += torch_cflags
            if "kernel" in kinds:
                flags += list(KERNEL_FLAGS)
            obj = obj_dir / f"{name}.o"
            t0 = time.monotonic()
            cmd = [cxx, *flags, "-x", "c++", "-c", str(src), "-o", str(obj)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise EmulationUnavailable(
                    f"emulation build failed compiling {src.relative_to(root)}:\n{(res.stderr or res.stdout)[-6000:]}"
                )
            if verbose:
                print(f"[emu build] {name:16s} {time.monotonic() - t0:5.1f} s", file=sys.stderr, flush=True)
            return obj

        units = _units(root)
        if verbose:
            print(f"[emu build] compiling {len(units)} units into {out_dir}", file=sys.stderr, flush=True)
        with cf.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
            objs = list(pool.map(compile_unit, units))
        tmp_lib = out_dir / f".{EXT_NAME}.{os.getpid()}.so"
        res = subprocess.run(
            [cxx, "-shared", "-o", str(tmp_lib), *map(str, objs), *ldflags], capture_output=True, text=True
        )
        if res.returncode != 0:
            raise EmulationUnavailable(f"emulation link failed:\n{(res.stderr or res.stdout)[-6000:]}")
        _check_defined(tmp_lib)
        os.replace(tmp_lib, lib)  # atomic: a concurrent builder sees the whole library or none
        shutil.rmtree(obj_dir, ignore_errors=True)
        return lib


def _check_defined(lib: Path) -> None:
    """Every symbol of the kernels' own namespaces must be defined in the library (a missing launcher or a
    declaration that drifted from its definition fails here, not at the first call)."""
    res = subprocess.run(["nm", "-uC", str(lib)], capture_output=True, text=True)
    missing = [line.strip() for line in res.stdout.splitlines() if "dcnv3::" in line or "emu::" in line]
    if missing:
        raise EmulationUnavailable("emulation link: undefined kernel symbols:\n  " + "\n  ".join(missing))


_lock = threading.Lock()
_modules: dict[str, object] = {}
_error: str | None = None


def load(lib: Path):
    """Import the extension at `lib` (each distinct build once per process)."""
    key = str(lib)
    if key not in _modules:
        loader = importlib.machinery.ExtensionFileLoader(EXT_NAME, key)
        spec = importlib.util.spec_from_file_location(EXT_NAME, key, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        _modules[key] = module
    return _modules[key]


BUILD_COMMAND = "python -m pretrain.ops.emulation"


def extension():
    """The built emulation extension, or None with `error()` saying why. Never compiles (see BUILD_COMMAND)."""
    global _error
    with _lock:
        lib = built_library()
        if lib is None:
            reason = missing_requirement()
            _error = f"cannot build the kernel emulation: {reason}" if reason else (
                f"the DCNv3 kernel emulation is not built for these sources: run `{BUILD_COMMAND}`"
            )
            return None
        try:
            module = load(lib)
        except ImportError as err:
            _error = f"the kernel emulation failed to load ({err}); rerun `{BUILD_COMMAND}`"
            return None
        _error = None
        return module


def error() -> str | None:
    extension()
    return _error


@contextlib.contextmanager
def thread_order(mode: str, seed: int = 0, ext=None):
    """Resume a CTA's threads in `mode` order (forward, reverse, shuffle) inside the block."""
    ext = ext or extension()
    ext.emu_set_order(mode, seed)
    try:
        yield
    finally:
        ext.emu_set_order("forward", 0)


@contextlib.contextmanager
def count(ext=None):
    """Collect per-launch counters of the kernels run inside the block: `with count() as launches: ...`."""
    ext = ext or extension()
    launches: list[dict] = []
    ext.emu_start_counting()
    try:
        yield launches
    finally:
        launches.extend(ext.emu_stop_counting())


def main(argv=None) -> int:
    try:
        lib = build(verbose=True)
    except EmulationUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"built {EXT_NAME}: {lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
