"""The csrc kernels on a CPU: build and load the emulation extension, set its thread order, read its counters.

    python -m pretrain.ops.build --emulation    # build (or find in the cache) and print where it is

The unmodified kernels of csrc/dcnv3 and the unmodified binding compile as host C++ with g++ against the small
CUDA shim of csrc/emu (`-DDCNV3_EMULATION`): a CTA's threads run as fibers, `__syncthreads`, warp shuffles and
`mma.sync` are emulated (the latter from the PTX ISA's fragment layouts), and the extension takes CPU tensors.
It is slow (a CPU core runs every thread), exact where the GPU is deterministic, and exists to test the real
kernels without a GPU and to count what they move (`count()`); `backend="cuda-emu"` uses it.

Builds are cached by a hash of everything they depend on (sources, flags, compiler, torch, CUTLASS) under
$PRETRAIN_DCNV3_EMU_DIR (default ~/.cache/internimage_pretrain/dcnv3-emu): one object per translation unit, keyed by
the files it includes, so an edit recompiles only the units that include the edited file. A build that adds entries
prunes the cache to the most recently used ones (build_cache.py). Needs g++, the CUTLASS headers (`nvidia-cutlass`)
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

from . import build_cache
from .toolchain import csrc_dir, cuda_include, cutlass_include

EXT_NAME = "internimage_dcnv3_emu"
# -fno-strict-aliasing: load_vec/store_vec reinterpret a uint4 as the element type (fine in CUDA, UB for g++).
# -g1: line tables, so the counters' call sites map to source lines (source_lines, `bench dcn --emulate --by-line`).
CXX_FLAGS = ("-std=c++17", "-O2", "-g1", "-fPIC", "-fno-strict-aliasing", "-DDCNV3_EMULATION", "-w")
# Extra flags for every unit and the link, e.g. an undefined-behaviour check of the kernels:
#   PRETRAIN_DCNV3_EMU_FLAGS="-fsanitize=undefined -fno-sanitize-recover=all" python -m pytest tests/test_kernel_emu.py
# (their own cache entry). With -fsanitize=address the counters' TSan hooks are left out (the two exclude each
# other), the runtime annotates its fiber switches for ASan, and Python needs ASan's runtime preloaded.
EXTRA_FLAGS_ENV = "PRETRAIN_DCNV3_EMU_FLAGS"


def _extra_flags() -> list[str]:
    return os.environ.get(EXTRA_FLAGS_ENV, "").split()


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


@functools.lru_cache(maxsize=1)
def _toolchain_id() -> str:
    """What every object depends on besides its sources: compiler, flags, torch, CUTLASS."""
    import torch

    cxx = os.environ.get("CXX", "g++")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    cutlass_version = (cutlass_include() / "cutlass" / "version.h").read_text()
    return repr((cxx, version, CXX_FLAGS, _extra_flags(), KERNEL_FLAGS, torch.__version__, cutlass_version))


def _units(root: Path) -> list[tuple[str, Path, bool, bool]]:
    """(name, source, needs torch headers, is a kernel unit) of every translation unit of the extension."""
    units = [
        ("binding", root / "dcnv3" / "binding.cpp", True, False),
        ("runtime", root / "emu" / "runtime.cpp", False, False),
    ]
    units += [(cu.stem, cu, False, True) for cu in sorted((root / "dcnv3" / "inst").glob("*.cu"))]
    return units


def _unit_flags(root: Path, torch_headers: bool, kernel: bool) -> list[str]:
    cuda_inc = cuda_include()
    # CUTLASS includes libcu++ as <cuda/std/...>: CUDA 13 keeps it under include/cccl.
    flags = [
        *CXX_FLAGS,
        *_extra_flags(),
        f"-I{cutlass_include()}",
        f"-I{cuda_inc}",
        f"-I{cuda_inc / 'cccl'}",
        f"-I{root / 'dcnv3'}",
    ]
    if torch_headers:
        flags += _torch_flags()[0]
    if kernel and not any("address" in f for f in _extra_flags()):  # ASan and TSan hooks exclude each other
        flags += list(KERNEL_FLAGS)
    return flags


def _unit_key(root: Path, src: Path, flags: list[str]) -> str:
    """Hash of a unit's own sources (its includes under root, found by the preprocessor) and the toolchain: an
    edit recompiles only the units that include the edited file."""
    cxx = os.environ.get("CXX", "g++")
    res = subprocess.run([cxx, *flags, "-x", "c++", "-MM", str(src)], capture_output=True, text=True)
    if res.returncode != 0:
        raise EmulationUnavailable(
            f"emulation build: cannot scan {src.relative_to(root)}:\n{res.stderr[-4000:]}"
        )
    deps = res.stdout.replace("\\\n", " ").split(":", 1)[1].split()
    h = hashlib.sha256(_toolchain_id().encode())
    for dep in sorted({Path(d).resolve() for d in deps}):
        if dep.is_relative_to(root.resolve()):
            h.update(dep.relative_to(root.resolve()).as_posix().encode() + b"\0" + dep.read_bytes())
    return hashlib.sha256((h.hexdigest() + src.name).encode()).hexdigest()[:20]


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


def _library_for(keys: list[str]) -> Path:
    lib_key = hashlib.sha256("".join(keys).encode()).hexdigest()[:20]
    return cache_root() / "lib" / lib_key / f"{EXT_NAME}.so"


def _plan(root: Path) -> list[tuple[str, Path, list[str], str]]:
    """(name, source, flags, cache key) per unit; the preprocessor scans run two at a time."""

    def one(unit):
        name, src, torch_headers, kernel = unit
        flags = _unit_flags(root, torch_headers, kernel)
        return name, src, flags, _unit_key(root, src, flags)

    with cf.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(one, _units(root)))


@functools.lru_cache(maxsize=1)
def library_path() -> Path | None:
    """Where the emulation library of this checkout's sources is (or would be) built; None if it cannot be."""
    if missing_requirement() is not None:
        return None
    return _library_for([key for *_, key in _plan(csrc_dir().parent)])


def built_library() -> Path | None:
    """The emulation library of the current sources if it was built, else None (never builds)."""
    lib = library_path()
    return lib if lib is not None and lib.exists() else None


def build(
    patches: dict[str, list[tuple[str, str]]] | None = None, jobs: int | None = None, verbose=True
) -> Path:
    """Compile (what the cache lacks) and link the emulation extension; -> the shared library's path.

    `patches` ({path relative to csrc/: [(old, new), ...]}) builds a mutant: only the units that include a
    patched file are compiled again, and the library gets its own cache entry.
    """
    reason = missing_requirement()
    if reason is not None:
        raise EmulationUnavailable(f"cannot build the DCNv3 kernel emulation: {reason}")
    cxx = os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory() as tmp:
        root = _mutated_tree(patches, Path(tmp)) if patches else csrc_dir().parent
        plan = _plan(root)
        lib = _library_for([key for *_, key in plan])
        if lib.exists():
            build_cache.mark_used(lib)
            return lib
        obj_dir = cache_root() / "obj"
        obj_dir.mkdir(parents=True, exist_ok=True)

        def compile_unit(unit):
            name, src, flags, key = unit
            obj = obj_dir / f"{name}-{key}.o"
            if obj.exists():
                build_cache.mark_used(obj)
                return obj
            t0 = time.monotonic()
            tmp_obj = obj_dir / f".{name}-{key}.{os.getpid()}.o"
            res = subprocess.run(
                [cxx, *flags, "-x", "c++", "-c", str(src), "-o", str(tmp_obj)], capture_output=True, text=True
            )
            if res.returncode != 0:
                raise EmulationUnavailable(
                    f"emulation build failed compiling {src.relative_to(root)}:\n{(res.stderr or res.stdout)[-6000:]}"
                )
            os.replace(tmp_obj, obj)
            if verbose:
                print(f"[emu build] {name:16s} {time.monotonic() - t0:5.1f} s", file=sys.stderr, flush=True)
            return obj

        if verbose:
            print(
                f"[emu build] {len(plan)} units (cached objects reused) -> {lib}", file=sys.stderr, flush=True
            )
        with cf.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
            objs = list(pool.map(compile_unit, plan))
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp_lib = lib.parent / f".{EXT_NAME}.{os.getpid()}.so"
        res = subprocess.run(
            [cxx, "-shared", "-o", str(tmp_lib), *map(str, objs), *_torch_flags()[1], *_extra_flags()],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise EmulationUnavailable(f"emulation link failed:\n{(res.stderr or res.stdout)[-6000:]}")
        _check_defined(tmp_lib)
        os.replace(tmp_lib, lib)  # atomic: a concurrent builder sees the whole library or none
        _prune_cache()
        return lib


def _prune_cache() -> None:
    """After a build added entries: each unit's objects, and the libraries, down to the most recently used."""
    build_cache.prune(cache_root() / "obj")
    build_cache.prune(
        cache_root() / "lib",
        unit_of=lambda entry: None if entry.name.startswith(".") else "lib",
        keep=2 * build_cache.KEEP_PER_UNIT,
        stamp=lambda entry: entry / f"{EXT_NAME}.so",
    )


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
        module.emu_set_shared_statics(shared_statics(lib))
        _modules[key] = module
    return _modules[key]


def shared_statics(lib: Path) -> list[tuple[int, int]]:
    """(offset, size) of the kernels' `__shared__` variables in `lib`: the emulation makes them function statics
    of the dcnv3 kernels (`_ZZN5dcnv3...`, GNU-unique data symbols), which the runtime poisons before each CTA."""
    res = subprocess.run(
        ["nm", "-D", "--defined-only", "-S", str(lib)], capture_output=True, text=True, check=True
    )
    statics = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] == "u" and parts[3].startswith("_ZZN5dcnv3"):
            statics.append((int(parts[0], 16), int(parts[1], 16)))
    if not statics:
        raise EmulationUnavailable(f"no __shared__ statics found in {lib}: cannot poison shared memory")
    return statics


BUILD_COMMAND = "python -m pretrain.ops.build --emulation"


_override = None


@contextlib.contextmanager
def using(module):
    """Route the cuda-emu backend to another emulation build inside the block (mutation tests)."""
    global _override
    previous, _override = _override, module
    try:
        yield module
    finally:
        _override = previous


def extension():
    """The built emulation extension, or None with `error()` saying why. Never compiles (see BUILD_COMMAND)."""
    global _error
    if _override is not None:
        return _override
    with _lock:
        lib = built_library()
        if lib is None:
            reason = missing_requirement()
            _error = (
                f"cannot build the kernel emulation: {reason}"
                if reason
                else (f"the DCNv3 kernel emulation is not built for these sources: run `{BUILD_COMMAND}`")
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
    """Inside the block, resume a CTA's threads, and run a launch's CTAs, in `mode` order (forward, reverse,
    shuffle)."""
    ext = ext or extension()
    ext.emu_set_order(mode, seed)
    try:
        yield
    finally:
        ext.emu_set_order("forward", 0)


def source_lines(offsets: list[int], lib: Path | None = None) -> dict[int, str]:
    """Call sites of the counters (each launch's "sites": (offset, kind, requests, sectors)) as source lines:
    offset -> "file:line < file:line < ... (function)": the access, then the lines it was inlined into, and the
    function they were compiled into (its template arguments tell e.g. which tile_gemm instantiation), by
    addr2line on the emulation library (built with CXX_FLAGS' -g1 line tables). "?" where a site has no line."""
    lib = lib or built_library()
    if lib is None or not offsets or shutil.which("addr2line") is None:
        return {o: "?" for o in offsets}
    # An offset is a return address: offset - 1 lies inside the call of the access hook. -a heads each address's
    # chain of (function, file:line) frames with the address itself.
    res = subprocess.run(
        ["addr2line", "-a", "-f", "-C", "-i", "-e", str(lib), *(hex(o - 1) for o in offsets)],
        capture_output=True,
        text=True,
    )
    chains: dict[int, list[list[str]]] = {}
    current = None
    for line in res.stdout.splitlines():
        if line.startswith("0x"):
            current = int(line, 16) + 1
            chains[current] = []
        elif current is not None:
            frames = chains[current]
            if frames and len(frames[-1]) == 1:
                frames[-1].append(Path(line.split(" (discriminator")[0]).name)  # the frame's file:line
            else:
                frames.append([line])  # the frame's function

    def describe(frames: list[list[str]]) -> str:
        where = [f[1] for f in frames if len(f) == 2 and not f[1].startswith("??")]
        if not where:
            return "?"
        function = (
            frames[-1][0].split("(")[0].removeprefix("void ").replace("dcnv3::", "").replace("cutlass::", "")
        )
        return " < ".join(where) + f" ({function})"

    return {o: describe(chains.get(o, [])) for o in offsets}


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
