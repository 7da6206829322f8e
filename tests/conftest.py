"""Shared test setup: select Keras 2 before anything imports TensorFlow; skip GPU-only tests."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sim_merlin  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from sim_merlin.environment import compute_backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # Modules with slow tests first: CI runs the files on 2 pytest-xdist workers (--dist
    # loadfile), which take files in this order, so the long ones do not start last.
    slow_modules = {item.module.__name__ for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)  # stable
    if compute_backend().is_gpu:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with cuDF (the CPU path is tested)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
