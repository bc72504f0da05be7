"""Device facts for the GPU check: Python, torch, the GPU, its driver, nvcc, and the packages the run imports.

    python scripts/gpu_check/facts.py OUT.json

Prints one `name: value` line per fact and writes them as JSON. Exit status 1 when something the run needs is
missing (a package that does not import, a CPU build of torch where a GPU is expected), so the check says so at
the start instead of minutes later; the other phases still run.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import subprocess
import sys

# import name -> why the run needs it
NEEDED = {
    "torch": "everything",
    "numpy": "everything",
    "yaml": "configs",
    "deepspeed": "phase d (the engine); carried",
    "pydantic": "deepspeed's config; carried",
    "hjson": "deepspeed; carried",
    "pyarrow": "the corpus reader (phase d recipe)",
    "fsspec": "corpus and checkpoint I/O",
    "tokenizers": "the M3I text tower's tokenizer (phase d recipe)",
    "PIL": "image decode (phase d recipe)",
    "cv2": "crop resize (phase d recipe)",
    "safetensors": "pretrain.convert imports",
    "tensorboard": "the monitor",
    "tqdm": "progress bars",
    "pytest": "phase a",
}
OPTIONAL = {
    "triton": "torch.compile (phase c)",
    "ninja": "extension builds",
    "cutlass_library": "CUTLASS headers",
}


def _run(cmd: list[str]) -> str | None:
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"error: {err}"
    return (res.stdout or res.stderr).strip()


def _version(module) -> str:
    return str(getattr(module, "__version__", None) or getattr(module, "VERSION", "?"))


def collect(expect_gpu: bool) -> tuple[dict, list[str]]:
    facts: dict = {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    problems: list[str] = []
    try:
        with open("/proc/meminfo") as f:
            facts["host_mem_gib"] = round(int(f.readline().split()[1]) / 1024**2, 1)
    except OSError:
        pass
    facts["disk_free_gib"] = round(shutil.disk_usage("/tmp").free / 1024**3, 1)
    packages = {}
    for name, why in {**NEEDED, **OPTIONAL}.items():
        try:
            mod = importlib.import_module(name)
            packages[name] = _version(mod) + ("" if name != "cutlass_library" else f" ({mod.__file__})")
        except Exception as err:  # a broken install is as bad as a missing one
            packages[name] = f"MISSING ({type(err).__name__}: {str(err)[:120]})"
            if name in NEEDED:
                problems.append(f"{name} does not import (needed for {why}): {str(err)[:120]}")
    facts["packages"] = packages
    try:
        import torch

        facts["torch_cuda"] = torch.version.cuda
        facts["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            facts["gpu"] = props.name
            facts["gpu_count"] = torch.cuda.device_count()
            facts["capability"] = f"{props.major}.{props.minor}"
            facts["gpu_mem_gib"] = round(props.total_memory / 1024**3, 1)
            facts["sm_count"] = props.multi_processor_count
            facts["bf16_supported"] = torch.cuda.is_bf16_supported()
        elif expect_gpu:
            problems.append(
                f"torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda})"
            )
    except Exception as err:
        problems.append(f"torch does not import: {err}")
    smi = _run(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
            "--format=csv,noheader",
        ]
    )
    facts["nvidia_smi"] = smi
    nvcc = _run(["nvcc", "--version"]) or (
        _run(["/usr/local/cuda/bin/nvcc", "--version"])
        if os.path.exists("/usr/local/cuda/bin/nvcc")
        else None
    )
    facts["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    facts["ninja"] = _run(["ninja", "--version"])
    if expect_gpu:
        if nvcc is None:
            problems.append("nvcc not found (PATH, /usr/local/cuda/bin): the extension cannot be built")
        if facts["ninja"] is None:
            problems.append("ninja not found: torch's extension builder needs it")
        if not facts["python"].startswith("3.12."):
            problems.append(f"Python {facts['python']}: the carried pydantic-core wheel is for 3.12")
    return facts, problems


def main(argv: list[str]) -> int:
    out = argv[0] if argv else None
    expect_gpu = os.environ.get("GPU_CHECK_DRY_RUN") != "1"
    facts, problems = collect(expect_gpu)
    facts["problems"] = problems
    for key, value in facts.items():
        if key == "packages":
            print("packages: " + ", ".join(f"{k} {v}" for k, v in value.items()))
        else:
            print(f"{key}: {value}")
    if out:
        with open(out, "w") as f:
            json.dump(facts, f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
