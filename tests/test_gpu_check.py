"""The prepared device run (scripts/gpu_check.sh) and its carry (scripts/gpu_carry.sh), checked on CPU.

The dry run executes the same plumbing as the GPU run (install check, facts, pytest -m gpu, bench model,
bench dcn, bench train, the H M3I recipe) with tiny shapes, so the script cannot rot between the rare GPU
sessions. The other tests cover what the dry run cannot reach: a step killed at its timeout, and the carry
check that must catch a missing dependency before a 15-minute lease is spent on it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "gpu_check" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_runs_every_phase_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^phase (\w+): (\w+) \(", res.stdout, re.M)}
    assert lines == {
        "install": lines["install"],  # ok when .carry/ exists here, skipped in CI (no network there)
        "facts": "ok",
        "build": "skipped",
        "a": "skipped",
        "b": "ok",
        "c": "ok",
        "n": "skipped",  # ncu needs a GPU
        "d": "ok",
    }
    assert lines["install"] in ("ok", "skipped")
    # what comes back from the device tool: at most 8 plain files with plain names
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "report.json", "report.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] is True
    assert report["facts"]["python"] == sys.version.split()[0]
    assert {r["model"] for r in report["model_check"]["rows"]} == {"internimage_t", "tiny_h"}
    assert all(r["pass"] for r in report["model_check"]["rows"] if "pass" in r)
    assert [r["impl"] for r in report["dcn"]] == ["reference"]
    assert {r["model"] for r in report["train"]} == {"internimage_t (tiny)", "internimage_h (tiny)"}
    assert all(r["samples/s"] > 0 and r["optimizer"] == "torch AdamW (fused)" for r in report["train"])
    recipe = report["recipe"]
    assert recipe["steps"] == 2 and set(recipe["losses"]) >= {"loss/semantic", "loss/intra", "loss/inter"}
    md = (out / "report.md").read_text()
    for heading in ("## Device facts", "## b. Model check", "## c. DCN block benchmark", "## d. Train step"):
        assert heading in md
    assert "DRY RUN" in md
    print(f"dry run took {seconds:.1f} s")


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    run = _load("run")
    args = run.argparse.Namespace(
        dry_run=True,
        out=str(tmp_path / "o"),
        work=str(tmp_path / "w"),
        budget=60.0,
        argv=[],
        python=sys.executable,
    )
    r = run.Run(args)
    r.work.mkdir(parents=True)
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    res = r.step("sleepy", ["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=1.0)
    assert res["rc"] == 124 and res["timed_out"]
    assert time.monotonic() - t0 < 15
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def _wheel(folder: Path, name: str, version: str, tag: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta + "\n")
    return path


def test_carry_verify_names_every_gap(tmp_path):
    carry = _load("carry")
    # a wheel needing a package neither carried nor on the device, one for the wrong Python, one whose
    # requirement the carried version does not satisfy; markers for other Pythons and extras are ignored
    _wheel(
        tmp_path, "alpha", "1.0", "py3-none-any", ["nosuchpkg>=1", "torch", 'tomli; python_version < "3.11"']
    )
    _wheel(tmp_path, "beta", "2.0", "cp311-cp311-manylinux_2_17_x86_64", ['sphinx; extra == "docs"'])
    _wheel(tmp_path, "gamma", "1.0", "py3-none-any", ["beta>=3"])
    problems = carry.verify(tmp_path, REPO)
    text = "\n".join(problems)
    assert "alpha-1.0-py3-none-any.whl needs nosuchpkg>=1" in text
    assert "beta-2.0-cp311" in text and "Python 3.12" in text
    assert "gamma-1.0-py3-none-any.whl needs beta>=3" in text
    assert "torch" not in text and "tomli" not in text and "sphinx" not in text
    assert "deepspeed==0.19.8 is missing" in text  # the pinned specs themselves
    assert "DCNv4==1.0.0.post2" in "\n".join(carry.missing(tmp_path))


def test_carry_specs_close_the_deepspeed_gap_here():
    """The pinned carry covers deepspeed's requirements as this venv's deepspeed declares them."""
    from importlib.metadata import requires

    carry = _load("carry")
    from packaging.requirements import Requirement

    carried = {carry.norm(s.split("==")[0]) for s in carry.SPECS}
    for text in requires("deepspeed") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = carry.norm(req.name)
        assert name in carried or name in carry.DEVICE_PACKAGES, f"deepspeed needs {name}: carry it"


def test_batch_search_keeps_the_predicted_step_within_the_device():
    """`pretrain bench train --batch-size auto`: the GPU-only probe's arithmetic (peaks at batch 8 and 16)."""
    from pretrain.bench.train import OPTIMIZER_BYTES_PER_PARAM, ZERO_BUFFERS_BYTES, fit_batch

    gib = 1024**3
    total, params = 140 * gib, 30_000_000
    peaks = [2 * gib, 3 * gib]  # 1 GiB fixed + 1/8 GiB per sample
    batch, how = fit_batch(peaks, 8, total, params, max_batch=4096)

    def need(b):
        return 1 * gib + b * gib / 8 + OPTIMIZER_BYTES_PER_PARAM * params + ZERO_BUFFERS_BYTES

    assert batch % 8 == 0 and need(batch) <= 0.85 * total < need(batch + 8)
    assert how["gib_per_sample"] == 0.125 and how["fixed_gib"] == 1.0
    assert fit_batch(peaks, 8, total, params, max_batch=256)[0] == 256
    # a model whose states alone exceed the device: batch 1, and the trainer's OOM says the rest
    assert fit_batch(peaks, 8, total, 10_000_000_000, max_batch=256)[0] == 1


def test_ncu_counters_become_a_table():
    """Phase n's parser on ncu's raw CSV (`--csv --page raw --print-units base`): profiler lines before the
    header, a units row, thousands separators; a kernel per row in launch order, and a total."""
    ncu = _load("ncu_block")
    header = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
              "Grid Size", "Device", "CC", "dram__bytes.sum", "gpu__time_duration.sum", "lts__t_bytes.sum",
              "sm__throughput.avg.pct_of_peak_sustained_elapsed"]  # fmt: skip
    units = ["", "", "", "", "", "", "", "", "", "", "", "byte", "nsecond", "byte", "%"]
    rows = [
        ["0", "7", "python3", "h", "void dcnv3::dcn_bwd_value_kernel<cutlass::bfloat16_t, 32, true, true, 128>"
         "(dcnv3::DcnParams)", "1", "7", "(128, 1, 1)", "(784, 1, 1)", "0", "9.0", "1,000,000", "250,000",
         "8,000,000", "61.5"],
        ["1", "7", "python3", "h", "void dcnv3::sum_slots_kernel<cutlass::bfloat16_t>(const float *, int, long, "
         "cutlass::bfloat16_t *)", "1", "7", "(128, 1, 1)", "(56, 1, 1)", "0", "9.0", "3,000,000", "4,000",
         "3,000,000", "n/a"],
    ]  # fmt: skip
    text = "==PROF== Connected to process 7\n" + "\n".join(
        ",".join(f'"{v}"' for v in row) for row in [header, units, *rows]
    )
    kernels = ncu.parse(text)
    assert [k["grid"] for k in kernels] == ["(784, 1, 1)", "(56, 1, 1)"]
    assert kernels[0]["dram__bytes.sum"] == 1e6 and kernels[0]["gpu__time_duration.sum"] == 250e3
    assert "sm__throughput.avg.pct_of_peak_sustained_elapsed" not in kernels[1]  # "n/a" is no number
    lines = ncu.table("H stage 1", kernels)
    assert lines[4].startswith("| dcn_bwd_value_kernel<bf16, 32, true, true, 128> | (784, 1, 1) | (128, 1, 1) | 250.0 "
                               "| 1.0 | 8.0 | 8.0 | 62 |"), lines[4]  # fmt: skip
    assert lines[-1].startswith("| all 2 | | | 254.0 | 4.0 | 11.0 | 2.8 |"), lines[-1]
    assert ncu.parse("==ERROR== Failed to find metric foo") == []
