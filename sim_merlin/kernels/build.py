"""Compile and load the fused kernels' shared library (``recurrent.cc``, ``sigmoid_mlp.cc``,
``adam.cc``, ``deferred_adam.cc``, ``embedding_rows.cc``, ``dot_attention.cc``,
``top_k_mask.cc``, ``prelu.cc``).

The library is built with the installed TensorFlow's compile and link flags and the host's
instruction set (``-march=native``: it is built where it runs), into a cache directory keyed by
the source, the TensorFlow build, the compiler and the CPU's flags, written to a temporary name
and renamed, so concurrent builds and interrupted ones never leave a broken library behind.

Example::

    >>> from sim_merlin.kernels.build import library_path
    >>> library_path().name
    'sim_merlin_kernels.so'
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = (HERE / "recurrent.cc", HERE / "sigmoid_mlp.cc", HERE / "adam.cc",
           HERE / "deferred_adam.cc", HERE / "embedding_rows.cc",
           HERE / "dot_attention.cc", HERE / "top_k_mask.cc", HERE / "prelu.cc")
# Per-source compiler flags. The Adam kernels must round as TensorFlow's Adam (no FMA; a square
# root that may set errno is not vectorized): adam_step.h.
_ADAM_FLAGS = ("-ffp-contract=off", "-fno-math-errno")
SOURCE_FLAGS = {"adam.cc": _ADAM_FLAGS, "deferred_adam.cc": _ADAM_FLAGS}
HEADERS = (HERE / "products.h", HERE / "parallel.h", HERE / "rows.h",
           HERE / "variable_ops.h", HERE / "adam_step.h")
LIBRARY = "sim_merlin_kernels.so"
DISABLE_VARIABLE = "SIM_MERLIN_FUSED_KERNELS"
CACHE_VARIABLE = "SIM_MERLIN_KERNEL_CACHE"


class KernelBuildError(RuntimeError):
    """The fused kernels could not be compiled or loaded (the plain TensorFlow path is used)."""


def enabled() -> bool:
    """False when ``SIM_MERLIN_FUSED_KERNELS`` is 0/false/no/off."""
    return os.environ.get(DISABLE_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles with bfloat16 products (``amx_tile`` and ``amx_bf16``)."""
    flags = _cpu_flags().split()
    return "amx_tile" in flags and "amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def _arch_flags(cxx: str) -> tuple[str, ...]:
    """``-march=native``, without AVX512-FP16 where the compiler would enable it: the Eigen that
    TensorFlow ships does not compile with it (g++ 12: ``predux_half_dowto4``), and the kernels
    have no half-precision code."""
    flags = ("-march=native",)
    if "avx512_fp16" not in _cpu_flags():
        return flags
    try:
        probe = subprocess.run([cxx, *flags, "-mno-avx512fp16", "-E", "-x", "c++", os.devnull],
                               capture_output=True, check=False)
    except OSError:  # no such compiler: build() says so
        return flags
    return flags + ("-mno-avx512fp16",) if probe.returncode == 0 else flags


@functools.lru_cache(maxsize=None)
def _tensorflow_flags() -> tuple[list[str], list[str], str]:
    import tensorflow as tf  # the caller has set up TensorFlow (sim_merlin.tf_compat)

    return tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags(), tf.__version__


def library_path() -> Path:
    """Where the library for this source, TensorFlow, compiler and CPU is (or will be) cached."""
    compile_flags, link_flags, version = _tensorflow_flags()
    key = hashlib.sha256()
    cxx = str(compiler())
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), version.encode(),
                 " ".join(compile_flags + list(_arch_flags(cxx))).encode(),
                 repr(sorted(SOURCE_FLAGS.items())).encode(),
                 " ".join(link_flags).encode(), cxx.encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    root = Path(os.environ.get(CACHE_VARIABLE)
                or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sim-merlin")
    return root / "kernels" / key.hexdigest()[:16] / LIBRARY


def build(force: bool = False, quiet: bool = False) -> Path:
    """Compile the library unless it is cached; return its path. Raises
    :class:`KernelBuildError`."""
    target = library_path()
    if target.exists() and not force:
        return target
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (install g++ or set CXX)")
    compile_flags, link_flags, _ = _tensorflow_flags()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=".kernels-", suffix=".so.partial",
                                       dir=target.parent)
    os.close(handle)
    common = [cxx, "-O3", *_arch_flags(cxx), "-fPIC", "-w", *compile_flags]
    objects = [f"{partial}.{source.stem}.o" for source in SOURCES]
    if not quiet:
        print(f"sim-merlin: compiling the fused kernels ({', '.join(f.name for f in SOURCES)}, "
              "~30 s) ...", file=sys.stderr, flush=True)
    try:
        # One compiler per source, side by side; then one link.
        jobs = [subprocess.Popen([*common, *SOURCE_FLAGS.get(source.name, ()), "-c",
                                  str(source), "-o", obj], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for source, obj in zip(SOURCES, objects)]
        failures = []
        for source, job in zip(SOURCES, jobs):
            _, stderr = job.communicate()
            if job.returncode != 0:
                failures.append(f"{source.name}:\n{stderr[-4000:]}")
        if failures:
            raise KernelBuildError(f"{cxx} failed on {HERE}:\n" + "\n".join(failures))
        result = subprocess.run([cxx, "-shared", "-fPIC", *objects, "-o", partial, *link_flags],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelBuildError(f"{cxx} failed to link {LIBRARY}:\n{result.stderr[-4000:]}")
        os.replace(partial, target)
    finally:
        for path in (partial, *objects):
            if os.path.exists(path):
                os.unlink(path)
    return target


@functools.lru_cache(maxsize=None)
def load():
    """The loaded op library (building it if needed), or ``None`` with a message on stderr when
    it is disabled or cannot be built: callers then take their plain TensorFlow path."""
    if not enabled():
        return None
    import tensorflow as tf

    try:
        return tf.load_op_library(str(build()))
    except (KernelBuildError, tf.errors.NotFoundError, OSError) as error:
        print(f"sim-merlin: fused kernels unavailable, using plain TensorFlow ops ({error})",
              file=sys.stderr)
        return None


def usable() -> bool:
    """The library is loaded (or loads now) and this process computes on the CPU (the kernels
    are CPU kernels)."""
    from sim_merlin.environment import visible_gpu_count

    return visible_gpu_count() == 0 and load() is not None


def threads() -> int:
    """Threads a fused kernel may use when TensorFlow's intra-op pool has one:
    ``SIM_MERLIN_KERNEL_THREADS``, else the CPUs this process may use divided among the
    processes of this machine (Horovod's local size)."""
    wanted = os.environ.get("SIM_MERLIN_KERNEL_THREADS")
    if wanted:
        return max(1, int(wanted))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = int(os.environ.get("HOROVOD_LOCAL_SIZE") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
                or 1)
    return max(1, (cpus or 1) // max(1, local))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    import sim_merlin.tf_compat  # noqa: F401  (before TensorFlow)

    try:
        path = build(force=args.force)
    except KernelBuildError as error:
        print(f"sim-merlin: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
