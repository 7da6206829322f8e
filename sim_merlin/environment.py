"""What this machine offers, found without importing TensorFlow: versions, GPU, GPU libraries.

The GPU parts of the stack (cuDF, dask-cuda with a CUDA device, NCCL) are optional. Every command
asks :func:`compute_backend` which path to take and :func:`announce_backend` tells the user once.

Example::

    >>> from sim_merlin.environment import compute_backend
    >>> compute_backend().name in ("cpu", "gpu")
    True
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from importlib import metadata


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or ``None``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def tensorflow_version() -> tuple[int, int] | None:
    """(major, minor) of the installed TensorFlow distribution, read from package metadata."""
    for dist in ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "intel-tensorflow"):
        version = package_version(dist)
        if version:
            return _major_minor(version)
    return None


@functools.lru_cache(maxsize=None)
def visible_gpu_count() -> int:
    """Number of NVIDIA GPUs the driver reports (0 without a driver); honours CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run(
            [smi, "--list-gpus"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


@dataclasses.dataclass(frozen=True)
class ComputeBackend:
    """The data-processing path a command takes: ``gpu`` (cuDF + dask-cuda) or ``cpu`` (pandas)."""

    name: str
    reason: str

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"


@functools.lru_cache(maxsize=None)
def compute_backend(prefer_gpu: bool = True) -> ComputeBackend:
    """Pick the GPU path only when a GPU, cuDF and dask-cuda are all present."""
    if not prefer_gpu:
        return ComputeBackend("cpu", "CPU requested")
    gpus = visible_gpu_count()
    missing = [m for m in ("cudf", "dask_cuda") if importlib.util.find_spec(m) is None]
    if gpus == 0:
        return ComputeBackend("cpu", "no NVIDIA GPU visible")
    if "cudf" in missing:
        return ComputeBackend(
            "cpu", f"{gpus} GPU(s) visible but cuDF is not installed (see README: GPU extras)"
        )
    if missing:
        return ComputeBackend("cpu", f"{gpus} GPU(s) visible but {', '.join(missing)} missing")
    return ComputeBackend("gpu", f"{gpus} GPU(s) with cuDF and dask-cuda")


_announced: set[str] = set()


MERLIN_NOTICES = ("Initializing an NVTabular Dataset in CPU mode",
                  "Changing an NVTabular Dataset to CPU", "PyTorch dtype mappings",
                  "Triton dtype mappings")


def quiet_merlin_notices() -> None:
    """Hide Merlin's repeated warnings about CPU mode and its optional PyTorch / Triton
    integrations (the commands announce the CPU/GPU path once themselves)."""
    import warnings

    for notice in MERLIN_NOTICES:
        warnings.filterwarnings("ignore", message=notice)


def announce_backend(command: str, backend: ComputeBackend | None = None, stream=None) -> None:
    """Print once per process which path ``command`` takes and why."""
    backend = backend or compute_backend()
    if command in _announced:
        return
    _announced.add(command)
    print(
        f"[sim-merlin] {command}: {backend.name.upper()} path ({backend.reason})",
        file=stream or sys.stderr,
        flush=True,
    )


def report() -> dict[str, str]:
    """Versions and capabilities that matter for bug reports and for picking a path."""
    backend = compute_backend()
    tf = next(
        (package_version(d) for d in ("tensorflow", "tensorflow-cpu") if package_version(d)),
        None,
    )
    rows = {
        "python": sys.version.split()[0],
        "tensorflow": tf or "not installed",
        "keras 2 (tf-keras)": package_version("tf-keras") or "-",
        "merlin-models": package_version("merlin-models") or "not installed",
        "nvtabular": package_version("nvtabular") or "not installed",
        "horovod": package_version("horovod") or "not installed (scripts/setup_env.py builds it)",
        "NVIDIA GPUs": str(visible_gpu_count()),
        "cudf": package_version("cudf") or package_version("cudf-cu12") or "not installed",
        "dask-cuda": package_version("dask-cuda") or "not installed",
        "data path": f"{backend.name.upper()} ({backend.reason})",
    }
    return rows

