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
