"""CI check of the fused DCNv3 kernels without a GPU: every CUDA translation unit compiles for sm_80 and sm_90a
and all of them link into one shared library (a duplicate or missing symbol fails), and the torch binding
compiles against torch's headers. Skipped with the reason when nvcc or CUTLASS is missing.

The 9 TUs compile two at a time, both archs in one nvcc call per TU (sharing the host pass): about 30 minutes of
CPU time in all (945 s of wall time on 2 cores, measured 2026-12-02, nvcc 13.0, CUTLASS 4.2; 205 s of CPU on
2026-11-25, before the persistent, 8-warp and cluster forms of the backward). conftest.py starts that compile in
the background at the lowest priority as soon as the run is collected, so that it uses the CPU the earlier tests
leave idle; the fixture waits for it. Clean results are cached by content hash outside the checkout (see CACHE),
so later runs with unchanged kernels -- a fresh CI clone on the same machine included -- skip the compile; the
binding check (~30 s CPU) always runs.
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

ARCHS = build.DEFAULT_ARCHS  # ("80", "90a"); the same as the background compile started by conftest.py
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
def compiled(tmp_path_factory, request):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    precompile = getattr(request.config, "kernel_precompile", None)  # started at collection (conftest.py)
    if precompile is not None:
        precompile.wait()
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


def _cuobjdump(compiled, unit: str, option: str) -> str:
    """cuobjdump's report (`option`: -sass, -res-usage) of a unit's compiled object; skips without the tool."""
    tool = toolchain.cuobjdump()
    if tool is None:
        pytest.skip(
            "cuobjdump/nvdisasm not found: pip install -e '.[test]' (nvidia-cuda-cuobjdump, -nvdisasm)"
        )
    _, _, obj = compiled[unit]
    if obj is None:
        pytest.skip("the unit failed to compile (reported by its own test)")
    res = subprocess.run([tool, option, str(obj)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def resource_usage(report: str) -> list[tuple[str, str, dict[str, int]]]:
    """(arch, function, {REG, STACK, SHARED, LOCAL, ...}) per kernel of a `cuobjdump -res-usage` report."""
    rows, arch, function = [], "?", None
    for line in report.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function ") and line.endswith(":"):
            function = line[len("Function ") : -1]
        elif function is not None and line.startswith("REG:"):
            fields = dict(f.split(":", 1) for f in line.split())
            rows.append((arch, function, {k: int(v) for k, v in fields.items() if v.isdigit()}))
            function = None
    return rows


def test_resource_usage_parser():
    report = """
arch = sm_90a
Resource usage:
 Function _ZN5dcnv3kA:
  REG:246 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:688 TEXTURE:0
 Function _ZN5dcnv3kB:
  REG:255 STACK:48 SHARED:27648 LOCAL:0 CONSTANT[0]:688
"""
    rows = resource_usage(report)
    assert [(a, f, u["REG"], u["STACK"], u["SHARED"]) for a, f, u in rows] == [
        ("sm_90a", "_ZN5dcnv3kA", 246, 0, 0),
        ("sm_90a", "_ZN5dcnv3kB", 255, 48, 27648),
    ]


@pytest.mark.parametrize("unit", [p.name for p in build.kernel_sources()])
def test_no_kernel_uses_local_memory(compiled, unit):
    """No kernel has a stack frame, for any arch: a register spill (the backward's sampling kernels spilled up to
    184 bytes at 255 registers on sm_90a) or an array indexed at run time both put values in local memory, which
    every access then reads through L1. Read from the compiled object with cuobjdump -res-usage."""
    rows = resource_usage(_cuobjdump(compiled, unit, "-res-usage"))
    assert rows, f"no kernels in the resource report of {unit}"
    for arch in ARCHS:
        assert any(a == f"sm_{arch}" for a, _, _ in rows), f"no sm_{arch} kernels in {unit}"
    stacked = [f"{a} {f}: {u['STACK']} bytes, {u['REG']} registers" for a, f, u in rows if u.get("STACK", 0)]
    assert not stacked, (
        f"{unit}: kernels with a stack frame (spills, or arrays indexed at run time; "
        "nvcc -Xptxas -v names the spills):\n" + "\n".join(stacked)
    )


@pytest.mark.parametrize("unit", ["dcn_bwd_f32.cu", "dcn_bwd_f16.cu", "dcn_bwd_bf16.cu"])
def test_grad_value_scatter_uses_native_shared_atomics(compiled, unit):
    """The backward's fixed-point scatter (two 32-bit words per element) compiles to native shared-memory adds
    (ATOMS.ADD) for every arch, none with a branch of its own. A 64-bit shared atomic add has no instruction of its
    own: nvcc turns it into a compare-and-swap loop (ATOMS.CAST.SPIN.64 on sm_90a), which took 70-95% of the H200's
    backward time (BENCHMARKS.md). Read from the compiled object with cuobjdump -sass."""
    sass = _cuobjdump(compiled, unit, "-sass")
    for arch in ARCHS:
        assert f"arch = sm_{arch}" in sass, f"no sm_{arch} code in {unit}"
    assert "ATOMS.ADD" in sass
    loops = sorted(set(re.findall(r"ATOMS\.CAS[.\w]*", sass)))
    assert not loops, f"{unit}: shared-memory compare-and-swap loops ({', '.join(loops)})"
    guarded = branched_atomics(sass)
    assert not guarded, (
        f"{unit}: shared atomics each behind a branch of their own (BSSY/BRA/BSYNC around every one; add 0 "
        f"instead, see shared_atomic_add_if): {guarded}"
    )


def branched_atomics(sass: str) -> dict[str, int]:
    """Per function: the ATOMS instructions that a predicated branch at most two instructions before jumps just
    past (to within two instructions after it): how nvcc compiles `if (pred) atomicAdd(...)`, predicated PTX
    included."""
    counts: dict[str, int] = {}
    function, branches = None, []
    for line in sass.splitlines():
        if "Function :" in line:
            function, branches = line.split()[-1], []
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)\S*\s*(0x[0-9a-f]+)?", line)
        if function is None or m is None:
            continue
        at, predicated, op, target = int(m.group(1), 16), m.group(2), m.group(3), m.group(4)
        if op == "ATOMS" and any(at < t <= at + 0x20 for t in branches):
            counts[function] = counts.get(function, 0) + 1
        branches = [*branches[-1:], int(target, 16) if op == "BRA" and predicated and target else -1]
    return counts


def test_branched_atomics_parser():
    sass = """
        Function : kernel_a
        /*0100*/                   ISETP.NE.AND P0, PT, R1, RZ, PT ;
        /*0110*/               @!P0 BRA 0x130 ;
        /*0120*/                   ATOMS.ADD RZ, [R2], R3 ;
        /*0130*/                   ATOMS.ADD RZ, [R2+0x4800], R4 ;
        Function : kernel_b
        /*0100*/                   ATOMS.ADD RZ, [R2], R3 ;
"""
    assert branched_atomics(sass) == {"kernel_a": 1}


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


def test_cached_objects_serve_a_clone_elsewhere(tmp_path, monkeypatch):
    """The key names the checkout's paths instead of spelling them: a fresh clone at another path (CI) reuses the
    objects, while a changed source still changes it."""
    import shutil

    if _missing():
        pytest.skip(_missing())
    src = build.kernel_sources()[0]
    here = build._check_key(src, ARCHS)
    shutil.copytree(build.csrc_dir().parent, tmp_path / "csrc")
    monkeypatch.setenv("PRETRAIN_CSRC", str(tmp_path / "csrc"))
    clone_src = tmp_path / "csrc" / "dcnv3" / "inst" / src.name
    assert build.kernel_sources()[0] == clone_src
    assert build._check_key(clone_src, ARCHS) == here
    with open(tmp_path / "csrc" / "dcnv3" / "common.cuh", "a") as f:
        f.write("\n// an edit\n")
    assert build._check_key(clone_src, ARCHS) != here


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
