"""What `.carry/` must hold for the device run, and a check that it closes every dependency gap.

    python scripts/gpu_check/carry.py missing .carry      # pinned specs not yet there (gpu_carry.sh fetches them)
    python scripts/gpu_check/carry.py verify .carry       # every requirement met by the carry or the device

The GPU machine has no network: a package it lacks and nobody carried fails the run minutes into a 15-minute
lease. `verify` reads the Requires-Dist of every carried wheel and of this project (pyproject.toml), evaluates
their markers for the device's Python, and checks each requirement is either carried (at a version the
specifier accepts) or in DEVICE_PACKAGES. It needs only `packaging` (any venv has it), never the network.
"""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from pathlib import Path

# The wheels to carry, pinned: deepspeed (pure Python) and the dependencies the device image lacks (deepspeed
# 0.19.8 needs hjson and pydantic>=2; pydantic 2.14.4 pins pydantic-core and needs typing-extensions>=4.16,
# newer than the device's may be), plus the CUTLASS headers for the kernel build. Versions are those the CPU
# venv runs (pydantic and pydantic-core must move together).
SPECS = [
    "deepspeed==0.19.8",
    "hjson==3.1.0",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "nvidia-cutlass==4.2.0.0",
]
# The DCNv4 peer (for `pretrain bench dcn`): an sdist, built on the device (its setup.py needs CUDA).
DCNV4 = ("DCNv4", "1.0.0.post2")
DEVICE_PYTHON = "3.12"

# Python packages of the device image ('cuda'), as /work/.library/device/KINDS.md lists them (read 2026-11-17).
# gpu_check.sh re-checks the ones the run imports on the device itself.
DEVICE_PACKAGES = set(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
    wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
# Project requirements the device run does not use: Ray (the run reads with data.reader=arrow).
NOT_NEEDED = {"ray"}
# Carried for files only: the build reads CUTLASS's headers (gpu_check.sh sets CUTLASS_HOME to them) and never
# imports the package's Python code, whose own requirements (cuda-python, pydot, treelib) are not needed.
FILES_ONLY = {"nvidia-cutlass"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata_of(path: Path) -> str:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            return z.read(meta).decode()
    with tarfile.open(path) as t:  # an sdist: its top-level PKG-INFO
        member = next(m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        return t.extractfile(member).read().decode()


def _field(meta: str, key: str) -> list[str]:
    head = meta.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith(key + ":")]


def _project_requirements(root: Path) -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]


def carried_versions(carry: Path) -> dict[str, str]:
    """{normalised name: version} of the wheels and sdists in `carry`."""
    from packaging.utils import parse_wheel_filename

    out = {}
    for f in carry.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(f.name)
        out[norm(name)] = str(version)
    for f in carry.glob("*.tar.gz"):
        name, version = f.name[: -len(".tar.gz")].rsplit("-", 1)
        out[norm(name)] = version
    return out


def missing(carry: Path) -> list[str]:
    """The pinned specs (and the DCNv4 sdist) not yet in `carry` at exactly their version."""
    have = carried_versions(carry) if carry.is_dir() else {}
    wanted = [*SPECS, "==".join(DCNV4)]
    return [s for s in wanted if have.get(norm(s.split("==")[0])) != s.split("==")[1]]


def verify(carry: Path, root: Path) -> list[str]:
    """Problems (empty when the carry closes every gap): a requirement neither carried nor on the device, a
    carried version the specifier refuses, two versions of one package, a wheel for another Python."""
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename
    from packaging.version import Version

    env = {"python_version": DEVICE_PYTHON, "python_full_version": DEVICE_PYTHON + ".3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip
    problems: list[str] = []
    carried: dict[str, Version] = {}
    sources: dict[str, list[str]] = {}
    files = sorted(carry.glob("*.whl")) + sorted(carry.glob("*.tar.gz"))
    for f in files:
        if f.suffix == ".whl":
            name, version, _, tags = parse_wheel_filename(f.name)
            interp = {t.interpreter for t in tags}
            if not interp & {"py3", "cp312", "py312"}:
                problems.append(
                    f"{f.name}: built for {sorted(interp)}, the device runs Python {DEVICE_PYTHON}"
                )
        else:
            name, version = f.name[: -len(".tar.gz")].rsplit("-", 1)
            version = Version(version)
        if norm(name) in carried:
            problems.append(f"two versions of {name} in {carry} (pip --target refuses): keep one")
        carried[norm(name)] = version
        if norm(name) not in FILES_ONLY:
            sources[str(f.name)] = _field(_metadata_of(f), "Requires-Dist")
    sources["pyproject.toml"] = _project_requirements(root)
    for origin, reqs in sources.items():
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = norm(req.name)
            if name in carried:
                if req.specifier and not req.specifier.contains(carried[name], prereleases=True):
                    problems.append(f"{origin} needs {req}, {carry} has {name} {carried[name]}")
            elif name not in DEVICE_PACKAGES and name not in NOT_NEEDED:
                problems.append(
                    f"{origin} needs {req}: not on the device (KINDS.md) and not carried; add it to SPECS"
                )
    for spec in SPECS + ["==".join(DCNV4)]:
        if norm(spec.split("==")[0]) not in carried:
            problems.append(f"{spec} is missing from {carry}: run scripts/gpu_carry.sh")
    return problems


def main(argv: list[str]) -> int:
    if argv[:1] == ["missing"] and len(argv) == 2:
        print("\n".join(missing(Path(argv[1]))))
        return 0
    if argv[:1] == ["verify"] and len(argv) == 2:
        problems = verify(Path(argv[1]), Path(__file__).resolve().parents[2])
        for p in problems:
            print(f"carry: {p}", file=sys.stderr)
        if not problems:
            print(f"carry: {argv[1]} closes every dependency gap of the device run")
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
