#!/usr/bin/env python
"""Build Horovod 0.28.1 from source (Gloo, CPU, TensorFlow) for the running venv, with a cache.

Run with the venv's Python (``scripts/setup_env.py`` does). The wheel is compiled against the
installed TensorFlow, so it is cached per TensorFlow version under
``$SIM_MERLIN_CACHE_DIR`` (default ``~/.cache/sim-merlin``); a rebuild takes about two minutes on
two cores, a cached install a few seconds.

The one source patch, applied in a visible step and only to the build copy:

* ``horovod/tensorflow/xla_mpi_ops.cc`` includes TensorFlow's XLA headers whenever TF >= 2.6,
  although everything that uses them is compiled only for GPU builds (``#if HAVE_GPU``). From TF
  2.16 on those headers include ``highwayhash``, which the TensorFlow wheel does not ship, so a
  CPU build fails with ``highwayhash/arch_specific.h: No such file or directory``. The patch moves
  the ``#if HAVE_GPU`` guard above the XLA includes. A CPU build compiles exactly the same code as
  before (nothing from the file); GPU builds are unchanged.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

VERSION = "0.28.1"
PATCHED_FILE = "horovod/tensorflow/xla_mpi_ops.cc"
FIRST_XLA_INCLUDE = '#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"'
GPU_GUARD = "#if HAVE_GPU"
BUILD_ENV = {
    "HOROVOD_WITH_TENSORFLOW": "1",
    "HOROVOD_WITH_GLOO": "1",
    "HOROVOD_WITHOUT_MPI": "1",
    "HOROVOD_WITHOUT_PYTORCH": "1",
    "HOROVOD_WITHOUT_MXNET": "1",
    "HOROVOD_CPU_OPERATIONS": "GLOO",
}
VERIFY = (
    "import horovod\n"
    "import sim_merlin.tf_compat\n"
    "import horovod.tensorflow as hvd\n"
    "import horovod.tensorflow.keras\n"
    "assert hvd.gloo_built(), 'Horovod was built without Gloo'\n"
    "hvd.init()\n"
    "print('horovod', horovod.__version__, 'gloo', hvd.gloo_built(), 'size', hvd.size())\n"
)


def log(message: str) -> None:
    print(f"[horovod] {message}", flush=True)


def tensorflow_version() -> str:
    for dist in ("tensorflow", "tensorflow-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    sys.exit("TensorFlow is not installed in this environment; install the lock first.")


def patch_xla_includes(source_root: Path) -> bool:
    """Move the GPU guard above the XLA includes (see module docstring). True if changed."""
    path = source_root / PATCHED_FILE
    lines = path.read_text().split("\n")
    try:
        first_include = lines.index(FIRST_XLA_INCLUDE)
        guard = lines.index(GPU_GUARD, first_include)
    except ValueError:
        log(f"patch: {PATCHED_FILE} does not have the expected layout; leaving it unchanged")
        return False
    if guard == first_include - 1:
        return False
    del lines[guard]
    lines.insert(first_include, GPU_GUARD)
    path.write_text("\n".join(lines))
    log(
        f"patch: {PATCHED_FILE}: moved '{GPU_GUARD}' from line {guard + 1} to line "
        f"{first_include + 1}, above the XLA includes (they are only used by GPU builds)"
    )
    return True


def cache_dir(tf_version: str) -> Path:
    base = os.environ.get("SIM_MERLIN_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "sim-merlin"
    # Keyed by what changes the binary (version, build flags, patch), not by this file's text.
    recipe = hashlib.sha256(
        repr((VERSION, sorted(BUILD_ENV.items()), inspect.getsource(patch_xla_includes))).encode()
    ).hexdigest()[:12]
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-tf{tf_version}-{recipe}"
    return Path(base) / "wheels" / f"horovod-{VERSION}-{tag}"


def build(target: Path) -> Path:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory(prefix="horovod-build-") as tmp:
        tmp = Path(tmp)
        log("downloading the source distribution")
        subprocess.run(
            [*pip, "download", "--no-deps", "--no-binary", ":all:", f"horovod=={VERSION}",
             "-d", str(tmp)],
            check=True,
        )
        sdist = next(tmp.glob(f"horovod-{VERSION}.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = tmp / f"horovod-{VERSION}"
        patch_xla_includes(source)
        env = dict(os.environ, **BUILD_ENV)
        env.setdefault("MAKEFLAGS", f"-j{os.cpu_count() or 2}")
        log("compiling (about two minutes on two cores)")
        subprocess.run(
            [*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp / "dist"),
             str(source)],
            check=True, env=env,
        )
        wheel = next((tmp / "dist").glob("horovod-*.whl"))
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        shutil.copy2(wheel, partial / wheel.name)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return next(target.glob("*.whl"))


def main() -> int:
    tf_version = tensorflow_version()
    target = cache_dir(tf_version)
    cached = sorted(target.glob("horovod-*.whl")) if target.is_dir() else []
    if cached:
        log(f"using cached wheel {cached[0]}")
        wheel = cached[0]
    else:
        log(f"no cached wheel for TensorFlow {tf_version}; building into {target}")
        wheel = build(target)
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps",
         "--force-reinstall", str(wheel)],
        check=True,
    )
    quiet = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, "-c", VERIFY], check=True, env=quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
