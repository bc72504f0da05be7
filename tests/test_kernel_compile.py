"""CI check of the fused DCNv3 kernels without a GPU: every CUDA translation unit compiles for sm_80 and sm_90a
and all of them link into one shared library (a duplicate or missing symbol fails), and the torch binding
compiles against torch's headers. Skipped with the reason when nvcc or CUTLASS is missing.

The 9 TUs compile two at a time, both archs in one nvcc call per TU (sharing the host pass): about 205 s of
CPU time in all, so about 1.8 minutes on 2 otherwise idle cores (measured 2026-11-25, nvcc 13.0, CUTLASS 4.2;
on the shared, heavily loaded 2-core box it took up to 14 minutes of wall time). Clean results are cached by
content hash outside the checkout (see CACHE), so later runs with unchanged kernels -- a fresh CI clone on the
same machine included -- skip the compile; the binding check (~30 s CPU) always runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pretrain.ops import build, toolchain

ARCHS = ("80", "90a")
# Objects keyed by a hash of every kernel source, flag, arch, nvcc and CUTLASS version: an unchanged kernel is
# not recompiled on every run (PRETRAIN_KERNEL_CHECK_CACHE=off forces a full compile).
_cache_env = os.environ.get("PRETRAIN_KERNEL_CHECK_CACHE", str(build.check_cache_dir()))
CACHE = None if _cache_env.lower() in ("off", "0", "") else Path(_cache_env)

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if build.nvcc() is None:
        return "nvcc not found (CUDA toolkit >= 12.3 needed for the compile-only kernel check)"
    if build.cutlass_include() is None:
        return "CUTLASS headers not found: pip install --no-deps nvidia-cutlass==4.2.0.0"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    results = build.compile_objects(ARCHS, jobs=2, out_dir=CACHE or tmp_path_factory.mktemp("objects"))
    return {name: (secs, err, obj) for name, secs, err, obj in results}


def test_every_dtype_and_pass_has_a_unit():
    names = {p.name for p in build.kernel_sources()}
    for dt in ("f32", "f16", "bf16"):
        for unit in ("dcn_fwd", "dcn_bwd", "gemm"):
            assert f"{unit}_{dt}.cu" in names


@pytest.mark.parametrize("unit", [p.name for p in build.kernel_sources()])
def test_kernel_unit_compiles(compiled, unit):
    secs, err, _ = compiled[unit]
    assert err is None, f"{unit} failed to compile for sm_{', sm_'.join(ARCHS)}:\n{err}"


def test_kernel_units_link_into_one_library(compiled):
    """What `python -m pretrain.ops.build` does after compiling: one shared library of all units."""
    objects = [obj for _, _, obj in compiled.values()]
    if None in objects:
        pytest.skip("a unit failed to compile (reported by its own test)")
    err = build.link_check(objects)
    assert err is None, f"the kernel units do not link:\n{err}"


@pytest.mark.parametrize("unit", ["dcn_bwd_f32.cu", "dcn_bwd_f16.cu", "dcn_bwd_bf16.cu"])
def test_grad_value_scatter_uses_native_shared_atomics(compiled, unit):
    """The backward's fixed-point scatter (two 32-bit words per element) compiles to native shared-memory adds
    (ATOMS.ADD) for every arch. A 64-bit shared atomic add has no instruction of its own: nvcc turns it into a
    compare-and-swap loop (ATOMS.CAST.SPIN.64 on sm_90a), which took 70-95% of the H200's backward time
    (BENCHMARKS.md). Read from the compiled object with cuobjdump -sass."""
    tool = toolchain.cuobjdump()
    if tool is None:
        pytest.skip(
            "cuobjdump/nvdisasm not found: pip install -e '.[test]' (nvidia-cuda-cuobjdump, -nvdisasm)"
        )
    _, err, obj = compiled[unit]
    if obj is None:
        pytest.skip("the unit failed to compile (reported by its own test)")
    res = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    sass = res.stdout
    for arch in ARCHS:
        assert f"arch = sm_{arch}" in sass, f"no sm_{arch} code in {unit}"
    assert "ATOMS.ADD" in sass
    loops = sorted(set(re.findall(r"ATOMS\.CAS[.\w]*", sass)))
    assert not loops, f"{unit}: shared-memory compare-and-swap loops ({', '.join(loops)})"


def test_link_check_catches_a_kernel_defined_twice(tmp_path):
    """A non-template __global__ defined in a header that two units include is two strong definitions."""
    if _missing():
        pytest.skip(_missing())
    (tmp_path / "k.cuh").write_text("__global__ void twice(float* x) { x[threadIdx.x] = 0.f; }\n")
    objects = []
    for name in ("a", "b"):
        src = tmp_path / f"{name}.cu"
        src.write_text(f'#include "k.cuh"\nvoid launch_{name}(float* x) {{ twice<<<1, 32>>>(x); }}\n')
        obj = tmp_path / f"{name}.o"
        res = subprocess.run(
            [build.nvcc(), "-gencode=arch=compute_80,code=sm_80", "-c", str(src), "-o", str(obj)],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        objects.append(obj)
    err = build.link_check(objects)
    assert err is not None and "twice" in err
    assert build.link_check(objects[:1]) is None


def test_binding_compiles_against_torch_headers(tmp_path):
    """binding.cpp is host C++ (torch + the launcher declarations): a syntax-only pass with the host compiler.

    The CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated for CUDA builds): a one-line
    stand-in is written to a temporary include dir. The CUDA runtime header comes from nvcc's toolkit.
    """
    reason = _missing()
    cxx = shutil.which("g++") or shutil.which("c++")
    if reason or cxx is None:
        pytest.skip(reason or "no host C++ compiler")
    import torch.utils.cpp_extension as ce

    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cuda_inc = build.cuda_include()
    if cuda_inc is None:
        pytest.skip("CUDA toolkit headers (cuda_runtime.h) not found; set CUDA_HOME")
    cmd = [
        cxx,
        "-std=c++17",
        "-fsyntax-only",
        "-w",
        f"-I{tmp_path}",
        *(f"-I{p}" for p in ce.include_paths()),
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{cuda_inc}",
        "-DTORCH_EXTENSION_NAME=internimage_dcnv3_C",
        str(build.csrc_dir() / "binding.cpp"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


def test_check_command_reports_missing_tools(monkeypatch, capsys):
    monkeypatch.setattr(build, "nvcc", lambda: None)
    assert build.main(["--check"]) == 1
    assert "nvcc" in capsys.readouterr().err


def test_gencode_flags_name_the_arch_specific_target():
    flags = build.gencode_flags(ARCHS)
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags  # plain sm_90 would stub out arch-specific code
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    # PTX of the portable arch, JIT-compiled by the driver on GPUs newer than sm_90 (no "no kernel image").
    assert "-gencode=arch=compute_80,code=compute_80" in flags
    assert not any("code=compute_90a" in f for f in flags)
    cmd = build.compile_only_command(Path("x.cu"), ARCHS, Path("x.o"))
    assert "-c" in cmd and "-std=c++17" in cmd and "--expt-relaxed-constexpr" in cmd


def test_cached_object_skips_recompiling(tmp_path):
    if _missing():
        pytest.skip(_missing())
    src = build.kernel_sources()[0]
    cached = tmp_path / f"{src.stem}-{build._check_key(src, ARCHS)}.o"
    cached.write_bytes(b"object")
    [(name, secs, err, obj)] = build.compile_objects(ARCHS, sources=[src], out_dir=tmp_path)
    assert (name, secs, err, obj) == (src.name, 0.0, None, cached)
    # Any change of inputs (here: the arch list) is a different key.
    assert build._check_key(src, ("80",)) != build._check_key(src, ARCHS)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
