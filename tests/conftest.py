"""Shared pytest setup: deterministic seeds, the `gpu` marker skip, quiet third-party telemetry."""

from __future__ import annotations

import os
import sys

import pytest

# Subprocesses that run `python`, `ray` or `deepspeed` by name (a Ray job's entrypoint, the launcher) must get
# this interpreter's environment even when the venv is not activated (CI runs `.venv/bin/python -m pytest`).
_bin = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _bin:
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-compiles a shared-memory comm op on first use (~45 s): cache it inside the checkout.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "torch_extensions"),
)


def pytest_collection_finish(session):
    """Start the nvcc compile check's objects (test_kernel_compile.py) compiling now, in the background at the
    lowest CPU priority, when this run will need them: on a cold cache they are about 30 minutes of CPU, and the
    tests before them leave one of CI's two cores idle much of the time. Its fixture waits for this process, then
    finds the objects cached (a unit that failed to compile is compiled again there, for its error)."""
    import subprocess

    wanted = any(
        item.nodeid.startswith("tests/test_kernel_compile.py")
        and "compiled" in getattr(item, "fixturenames", ())
        for item in session.items
    )
    if not wanted:
        return
    # The fixture's own settings and tool check: the same archs and cache directory, so it finds these objects.
    from test_kernel_compile import ARCHS, CACHE, _missing

    if CACHE is None or _missing() is not None:
        return
    session.config.kernel_precompile = subprocess.Popen(
        [sys.executable, "-c", _PRECOMPILE.format(archs=tuple(ARCHS), cache=str(CACHE))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_lowest_priority_child,
        start_new_session=True,  # its own process group: ended as one, nvcc included
    )


# Ends its whole group (its nvcc processes) on SIGTERM: from pytest_sessionfinish, or from the kernel when pytest
# dies without finishing (PR_SET_PDEATHSIG below).
_PRECOMPILE = """
import os, signal
signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
from pretrain.ops import build
build.compile_objects({archs!r}, 2, out_dir={cache!r})
"""


def _lowest_priority_child():
    import ctypes
    import signal

    os.nice(19)
    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG: SIGTERM when pytest exits


def pytest_sessionfinish(session):
    proc = getattr(session.config, "kernel_precompile", None)
    if proc is not None and proc.poll() is None:  # a run that stopped early: leave no nvcc behind
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _launcher_env_per_test():
    """An in-process run sets the launcher variables of a world of one (pretrain.engine.dist): restore them after
    each test, so that a later test's subprocesses do not inherit its MASTER_PORT."""
    saved = {key: os.environ.get(key) for key in _LAUNCHER_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
