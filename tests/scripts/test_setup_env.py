"""The pinned environment: locks are complete and exact, and this venv is exactly its lock."""
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sim_merlin.environment import tensorflow_version

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.compat_lock


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_env = _load("setup_env")
build_horovod = _load("build_horovod")


def _lock_for_this_env():
    return "tf2.21" if tensorflow_version() >= (2, 16) else "tf2.12"


@pytest.mark.parametrize("lock", ["tf2.21", "tf2.12"])
def test_lock_pins_every_top_level_requirement_exactly(lock):
    pins = setup_env.read_lock(ROOT / "requirements" / f"{lock}.lock")
    assert all("==" in line for line in pins.values())
    for raw in (ROOT / "requirements" / f"{lock}.in").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split("=")[0].split("<")[0].split(">")[0].strip()
        assert setup_env.normalise(name) in pins, f"{name} from {lock}.in is not in the lock"
        if "==" in line:
            assert pins[setup_env.normalise(name)].split("==")[1] == line.split("==")[1]


def test_this_environment_is_exactly_its_lock():
    pins = setup_env.read_lock(ROOT / "requirements" / f"{_lock_for_this_env()}.lock")
    # pip's view (a fresh process): importlib.metadata inside this one would also list the
    # packages setuptools vendors once something has imported setuptools.
    installed = setup_env.installed(Path(sys.executable))
    extra = set(installed) - set(pins) - setup_env.NOT_LOCKED
    assert not extra, f"installed but not locked: {sorted(extra)}"
    for name, line in pins.items():
        assert installed.get(name) == line.split("==")[1], f"{name}: lock says {line}"


def test_a_malformed_lock_line_is_reported_with_its_line_number(tmp_path):
    lock = tmp_path / "bad.lock"
    lock.write_text("numpy==1.26.4\npandas>=1.5\n")
    with pytest.raises(SystemExit, match=r"bad.lock:2: expected 'name==version'"):
        setup_env.read_lock(lock)


def test_horovod_patch_moves_the_gpu_guard_above_the_xla_includes(tmp_path):
    source = tmp_path / "horovod" / "tensorflow"
    source.mkdir(parents=True)
    original = textwrap.dedent(
        f"""\
        #if TENSORFLOW_VERSION >= 2006000000

        {build_horovod.FIRST_XLA_INCLUDE}
        #include "other.h"

        #if HAVE_GPU
        gpu_only();
        #endif // HAVE_GPU
        #endif
        """
    )
    (source / "xla_mpi_ops.cc").write_text(original)
    assert build_horovod.patch_xla_includes(tmp_path) is True
    lines = (source / "xla_mpi_ops.cc").read_text().split("\n")
    guard = lines.index("#if HAVE_GPU")
    assert lines[guard + 1] == build_horovod.FIRST_XLA_INCLUDE
    assert lines.count("#if HAVE_GPU") == 1 and lines.count("#endif // HAVE_GPU") == 1
    assert build_horovod.patch_xla_includes(tmp_path) is False  # idempotent


@pytest.mark.skipif(tensorflow_version() < (2, 16), reason="the primary lock builds Horovod")
def test_horovod_is_built_with_gloo_and_allreduces_across_two_processes(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(
        textwrap.dedent(
            """\
            import sim_merlin.tf_compat
            import horovod.tensorflow as hvd
            import tensorflow as tf
            hvd.init()
            total = hvd.allreduce(tf.constant([hvd.rank() + 1.0, 10.0]), op=hvd.Sum)
            print(f"rank {hvd.rank()} of {hvd.size()}: {total.numpy().tolist()}", flush=True)
            """
        )
    )
    horovodrun = Path(sys.executable).parent / "horovodrun"
    result = subprocess.run(
        [str(horovodrun), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0 of 2: [3.0, 20.0]" in result.stdout
    assert "rank 1 of 2: [3.0, 20.0]" in result.stdout
