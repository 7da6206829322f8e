import json
import subprocess
import sys

import pytest

from sim_merlin import environment


@pytest.fixture(autouse=True)
def _fresh_caches():
    environment.visible_gpu_count.cache_clear()
    environment.compute_backend.cache_clear()
    yield
    environment.visible_gpu_count.cache_clear()
    environment.compute_backend.cache_clear()


def test_this_machine_takes_the_cpu_path_and_says_why(monkeypatch):
    monkeypatch.setattr(environment, "visible_gpu_count", lambda: 0)
    backend = environment.compute_backend()
    assert backend.name == "cpu" and not backend.is_gpu
    assert "no NVIDIA GPU" in backend.reason


def test_a_gpu_without_cudf_falls_back_to_cpu_with_the_reason(monkeypatch):
    monkeypatch.setattr(environment, "visible_gpu_count", lambda: 2)
    monkeypatch.setattr(environment.importlib.util, "find_spec", lambda name: None)
    backend = environment.compute_backend()
    assert backend.name == "cpu" and "cuDF is not installed" in backend.reason


def test_gpu_path_needs_a_gpu_cudf_and_dask_cuda(monkeypatch):
    monkeypatch.setattr(environment, "visible_gpu_count", lambda: 1)
    monkeypatch.setattr(environment.importlib.util, "find_spec", lambda name: object())
    assert environment.compute_backend().is_gpu
    assert environment.compute_backend(prefer_gpu=False).name == "cpu"


def test_cuda_visible_devices_hides_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert environment.visible_gpu_count() == 0


def test_the_backend_is_announced_once_per_command(capsys):
    environment._announced.clear()
    backend = environment.ComputeBackend("cpu", "no NVIDIA GPU visible")
    environment.announce_backend("preprocess", backend)
    environment.announce_backend("preprocess", backend)
    err = capsys.readouterr().err
    assert err.count("preprocess: CPU path (no NVIDIA GPU visible)") == 1


def test_versions_come_from_package_metadata_without_importing_tensorflow():
    code = (
        "import json, sys; from sim_merlin.environment import tensorflow_version, report; "
        "v = tensorflow_version(); r = report(); "
        "print(json.dumps([v, 'tensorflow' in sys.modules, r['data path']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    version, imported, path = json.loads(out.stdout)
    assert version[0] == 2 and version[1] >= 12
    assert imported is False
    assert path.startswith(("CPU (", "GPU ("))


@pytest.mark.gpu
def test_gpu_machines_take_the_gpu_path():
    assert environment.compute_backend().is_gpu
