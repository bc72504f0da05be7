"""Build (and find) the optional fused DCNv3 CUDA extension from csrc/dcnv3.

    python -m pretrain.ops.build               # build for sm_80 + sm_90a into the cache dir, then import it
    python -m pretrain.ops.build --arch 90a    # one arch only (faster build)
    python -m pretrain.ops.build --check       # compile-only nvcc check of every kernel TU (no GPU, no CUDA torch)
    python -m pretrain.ops.build --emulation   # the kernels as host C++ for the CPU emulation (pretrain/ops/emulation.py)

Building needs a CUDA build of torch, nvcc (>= 12.3 for sm_90a) and ninja, and the CUTLASS headers of the
`nvidia-cutlass` pip package (or $CUTLASS_HOME/include). It never runs implicitly: a CPU-only install never
needs any of it, and `pretrain.ops.cuda` only *imports* an extension that this command built
(from $PRETRAIN_DCNV3_BUILD_DIR, default ~/.cache/internimage_pretrain/dcnv3-<torch version>).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import build_cache
from .toolchain import csrc_dir, cuda_include, cutlass_include, nvcc

__all__ = [
    "EXT_NAME",
    "build",
    "built_library",
    "compile_check",
    "csrc_dir",
    "cuda_include",
    "cutlass_include",
    "nvcc",
]

EXT_NAME = "internimage_dcnv3_C"
DEFAULT_ARCHS = ("80", "90a")

# Flags shared by the JIT build and the compile-only check. -std=c++17 / relaxed constexpr are what CUTLASS 4
# needs with nvcc 13; the -U flags undo torch's __CUDA_NO_HALF*__ defines, which CUTLASS's half types expect off.
NVCC_FLAGS = (
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "-O3",
    "-DNDEBUG",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
)


def kernel_sources() -> list[Path]:
    """The per-dtype instantiation units (CUDA), in a stable order."""
    return sorted((csrc_dir() / "inst").glob("*.cu"))


def gencode_flags(archs) -> list[str]:
    """`-gencode` per arch ("90a" needs the explicit compute_90a form: plain sm_90 silently stubs it), plus PTX of
    the oldest portable arch: on a GPU newer than every listed arch the driver JIT-compiles it instead of failing
    every launch with "no kernel image" (arch-specific "a" targets have no forward-compatible PTX)."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    portable = sorted((a for a in archs if not a.endswith("a")), key=int)
    if portable:
        flags.append(f"-gencode=arch=compute_{portable[0]},code=compute_{portable[0]}")
    return flags


def build_dir() -> Path:
    import torch

    default = Path.home() / ".cache" / "internimage_pretrain" / f"dcnv3-{torch.__version__}"
    return Path(os.environ.get("PRETRAIN_DCNV3_BUILD_DIR", default))


def built_library() -> Path | None:
    """The extension's shared library if `python -m pretrain.ops.build` produced one, else None."""
    d = build_dir()
    for suffix in (".so", ".pyd"):
        lib = d / f"{EXT_NAME}{suffix}"
        if lib.exists():
            return lib
    return None


def build(archs=DEFAULT_ARCHS, verbose: bool = True):
    """JIT-build the extension with torch.utils.cpp_extension (ninja) and return the loaded module."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError(
            f"torch {torch.__version__} is a CPU build: the DCNv3 extension needs a CUDA build of torch "
            "(the CPU install uses the reference op; `python -m pretrain.ops.build --check` compile-checks only)"
        )
    inc = cutlass_include()
    if inc is None:
        raise RuntimeError(
            "CUTLASS headers not found: `pip install --no-deps nvidia-cutlass==4.2.0.0` or set CUTLASS_HOME"
        )
    src = csrc_dir()
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=EXT_NAME,
        sources=[str(src / "binding.cpp"), *map(str, kernel_sources())],
        extra_include_paths=[str(inc), str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=[*NVCC_FLAGS, *gencode_flags(archs)],
        build_directory=str(out),
        verbose=verbose,
    )


def compile_only_command(source: Path, archs, output: Path) -> list[str]:
    """The nvcc command that compile-checks one kernel TU (device code for every arch, no linking)."""
    return [
        nvcc() or "nvcc",
        *NVCC_FLAGS,
        *gencode_flags(archs),
        "-Xcompiler=-fPIC",  # as in the extension build: the objects must link into a shared library
        f"-I{cutlass_include()}",
        f"-I{csrc_dir()}",
        "-c",
        str(source),
        "-o",
        str(output),
    ]


def _check_key(src: Path, archs) -> str:
    """Hash of everything a compile-only result depends on: all kernel sources and headers, the TU, the
    flags and archs, the nvcc version and the CUTLASS headers' version."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(csrc_dir().rglob("*")):
        if f.suffix in (".h", ".cuh", ".cu", ".cpp"):
            h.update(f.relative_to(csrc_dir()).as_posix().encode() + f.read_bytes())
    version = subprocess.run([nvcc() or "nvcc", "--version"], capture_output=True, text=True).stdout
    cutlass_version = (cutlass_include() / "cutlass" / "version.h").read_bytes()
    # Every flag as run, with the checkout's own paths (csrc/, and the venv's CUTLASS, hashed by its version
    # above) named rather than spelled out: a clone elsewhere on the machine (a fresh CI clone) reuses the objects.
    places = {str(cutlass_include()): "<cutlass>", str(csrc_dir()): "<csrc>"}
    command = [_named_places(arg, places) for arg in compile_only_command(src, archs, Path("unit.o"))[1:]]
    h.update(repr((src.name, tuple(archs), command, version)).encode() + cutlass_version)
    return h.hexdigest()[:32]


def _named_places(arg: str, places: dict[str, str]) -> str:
    for path, name in places.items():
        arg = arg.replace(path, name)
    return arg


def compile_objects(
    archs=DEFAULT_ARCHS, jobs: int = 2, sources=None, out_dir: Path | None = None
) -> list[tuple[str, float, str | None, Path | None]]:
    """nvcc -c every kernel TU for `archs`, `jobs` at a time: [(name, seconds, error or None, object)].

    Objects are named by `_check_key` in `out_dir`: one whose exact inputs already compiled is reused (seconds
    reported as 0), like ccache, since the object is a pure function of those inputs. After a compile, each unit
    keeps its most recently used objects there (build_cache.prune).
    """
    sources = list(sources or kernel_sources())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(src: Path):
        t0 = time.monotonic()
        obj = out_dir / f"{src.stem}-{_check_key(src, archs)}.o"
        if obj.exists():
            build_cache.mark_used(obj)
            return src.name, 0.0, None, obj
        tmp_obj = obj.with_name(f".{obj.name}.{os.getpid()}")
        res = subprocess.run(compile_only_command(src, archs, tmp_obj), capture_output=True, text=True)
        if res.returncode != 0:
            tmp_obj.unlink(missing_ok=True)
            return src.name, time.monotonic() - t0, (res.stderr or res.stdout)[-4000:], None
        os.replace(tmp_obj, obj)
        return src.name, time.monotonic() - t0, None, obj

    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, sources))
    if any(secs > 0 for _, secs, _, _ in results):  # entries were added: keep the most recently used per unit
        build_cache.prune(out_dir)
    return results


def compile_check(
    archs=DEFAULT_ARCHS, jobs: int = 2, sources=None, cache_dir: Path | None = None
) -> list[tuple[str, float, str | None]]:
    """Compile every kernel TU (see `compile_objects`; cached in `cache_dir` when given): [(name, s, error)]."""
    with tempfile.TemporaryDirectory() as tmp:
        results = compile_objects(archs, jobs, sources, cache_dir or tmp)
    return [(name, secs, err) for name, secs, err, _ in results]


def link_check(objects) -> str | None:
    """Link kernel objects into one shared library as the extension build would (device code included, every
    symbol resolved): None when it links, else the linker's complaint. A kernel defined in a header that
    several units include (a duplicate symbol) or a launcher declared but never defined fails here."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc() or "nvcc", "-shared", "-o", str(Path(tmp) / "link_check.so"), *map(str, objects)]
        cmd += ["-Xlinker", "--no-undefined"]
        res = subprocess.run(cmd, capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr or res.stdout)[-4000:]


def check_cache_dir() -> Path:
    """Where `--check` keeps compiled objects: outside the checkout, so a fresh clone on the same machine (CI)
    reuses them while the kernels are unchanged."""
    default = Path.home() / ".cache" / "internimage_pretrain" / "kernel-check"
    return Path(os.environ.get("PRETRAIN_KERNEL_CHECK_CACHE", default))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.ops.build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--arch", action="append", help="CUDA arch (80, 90a, ...); repeatable; default 80 and 90a"
    )
    parser.add_argument("--check", action="store_true", help="compile-only check of the kernel TUs with nvcc")
    parser.add_argument(
        "--emulation",
        action="store_true",
        help="build the CPU emulation of the kernels (g++; the cuda-emu backend)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes for --check")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or DEFAULT_ARCHS)
    if args.emulation:
        from . import emulation

        try:
            lib = emulation.build(jobs=args.jobs, verbose=not args.quiet)
        except emulation.EmulationUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"built {emulation.EXT_NAME}: {lib}")
        return 0
    if args.check:
        if nvcc() is None or cutlass_include() is None:
            print(
                "nvcc or the CUTLASS headers are missing (pip install nvidia-cutlass==4.2.0.0)",
                file=sys.stderr,
            )
            return 1
        failed = 0
        results = compile_objects(archs, args.jobs, out_dir=check_cache_dir())
        for name, secs, err, _ in results:
            print(f"{name:24s} {'ok' if err is None else 'FAILED'} {secs:6.1f} s  sm_{', sm_'.join(archs)}")
            if err:
                failed += 1
                print(err, file=sys.stderr)
        if not failed:
            err = link_check([obj for *_, obj in results])
            print(f"{'link':24s} {'ok' if err is None else 'FAILED'}")
            if err:
                failed += 1
                print(err, file=sys.stderr)
        return 1 if failed else 0
    try:
        mod = build(archs, verbose=not args.quiet)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"built {EXT_NAME} for sm_{', sm_'.join(archs)}: {mod.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
