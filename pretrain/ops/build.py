"""Build (and find) the optional fused DCNv3 CUDA extension from csrc/dcnv3.

    python -m pretrain.ops.build               # build for sm_80 + sm_90a into the cache dir, then import it
    python -m pretrain.ops.build --arch 90a    # one arch only (faster build)
    python -m pretrain.ops.build --check       # compile-only nvcc check of every kernel TU (no GPU, no CUDA torch)

Building needs a CUDA build of torch, nvcc (>= 12.3 for sm_90a) and ninja, and the CUTLASS headers of the
`nvidia-cutlass` pip package (or $CUTLASS_HOME/include). It never runs implicitly: a CPU-only install never
needs any of it, and `pretrain.ops.cuda` only *imports* an extension that this command built
(from $PRETRAIN_DCNV3_BUILD_DIR, default ~/.cache/internimage_pretrain/dcnv3-<torch version>).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def csrc_dir() -> Path:
    """csrc/dcnv3 of this checkout (the sources are not shipped inside the wheel)."""
    path = Path(os.environ.get("PRETRAIN_CSRC", Path(__file__).resolve().parents[2] / "csrc")) / "dcnv3"
    if not (path / "binding.cpp").exists():
        raise FileNotFoundError(
            f"DCNv3 CUDA sources not found at {path}; set PRETRAIN_CSRC to the repo's csrc/"
        )
    return path


def kernel_sources() -> list[Path]:
    """The per-dtype instantiation units (CUDA), in a stable order."""
    return sorted((csrc_dir() / "inst").glob("*.cu"))


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


def gencode_flags(archs) -> list[str]:
    """`-gencode` per arch; "90a" needs the explicit compute_90a form (plain sm_90 silently stubs it)."""
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


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


def compile_only_command(source: Path, archs, output: Path) -> list[str]:
    """The nvcc command that compile-checks one kernel TU (device code for every arch, no linking)."""
    return [
        nvcc() or "nvcc",
        *NVCC_FLAGS,
        *gencode_flags(archs),
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
    h.update(repr((src.name, tuple(archs), NVCC_FLAGS, version)).encode() + cutlass_version)
    return h.hexdigest()[:32]


def compile_check(
    archs=DEFAULT_ARCHS, jobs: int = 2, sources=None, cache_dir: Path | None = None
) -> list[tuple[str, float, str | None]]:
    """Compile every kernel TU for `archs` with nvcc -c, `jobs` at a time: [(name, seconds, error or None)].

    With `cache_dir`, a TU whose exact inputs (see `_check_key`) already compiled cleanly is not compiled
    again (seconds reported as 0): like ccache, the result is a pure function of those inputs.
    """
    sources = list(sources or kernel_sources())
    with tempfile.TemporaryDirectory() as tmp:

        def one(src: Path):
            t0 = time.monotonic()
            stamp = None
            if cache_dir is not None:
                stamp = Path(cache_dir) / f"{src.stem}-{_check_key(src, archs)}.ok"
                if stamp.exists():
                    return src.name, 0.0, None
            cmd = compile_only_command(src, archs, Path(tmp) / f"{src.stem}.o")
            res = subprocess.run(cmd, capture_output=True, text=True)
            err = None if res.returncode == 0 else (res.stderr or res.stdout)[-4000:]
            if err is None and stamp is not None:
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.write_text(" ".join(cmd) + "\n")
            return src.name, time.monotonic() - t0, err

        with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, sources))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.ops.build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--arch", action="append", help="CUDA arch (80, 90a, ...); repeatable; default 80 and 90a"
    )
    parser.add_argument("--check", action="store_true", help="compile-only check of the kernel TUs with nvcc")
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes for --check")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or DEFAULT_ARCHS)
    if args.check:
        if nvcc() is None or cutlass_include() is None:
            print(
                "nvcc or the CUTLASS headers are missing (pip install nvidia-cutlass==4.2.0.0)",
                file=sys.stderr,
            )
            return 1
        failed = 0
        for name, secs, err in compile_check(archs, args.jobs):
            print(f"{name:24s} {'ok' if err is None else 'FAILED'} {secs:6.1f} s  sm_{', sm_'.join(archs)}")
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
