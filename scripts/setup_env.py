#!/usr/bin/env python3
"""Create or update a virtual environment from one of the project's lock files (idempotent).

    python3 scripts/setup_env.py                      # .venv from requirements/tf2.21.lock + Horovod
    python3 scripts/setup_env.py --lock tf2.12        # .venv-tf2.12 from requirements/tf2.12.lock

What it does, in order, and only when something changed since the last successful run (a stamp in
the venv records the hash of the lock, this script and pyproject.toml):

1. creates the venv with the running Python (3.11 required);
2. installs pip, setuptools, wheel and packaging at the lock's versions (a few locked packages
   are source distributions and build with them), then every locked package with
   ``--no-deps`` (the resolver picks nothing) and ``--no-build-isolation`` (sdists build with the
   locked setuptools), then removes packages the lock does not list;
3. installs this project in editable mode, without dependencies;
4. builds Horovod 0.28.1 from source with Gloo for the installed TensorFlow (see
   ``scripts/build_horovod.py``), reusing a cached wheel when one exists;
5. runs ``pip check`` and a smoke import, then writes the stamp;
6. (every run, even an up-to-date one) compiles the fused C++ kernels against the venv's
   TensorFlow unless they are already cached for these sources (``sim_merlin.kernels.build``;
   a failure is reported and the models fall back to plain TensorFlow ops).

Standard library only: it runs before any environment exists.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = {"tf2.21": ".venv", "tf2.12": ".venv-tf2.12"}
BOOTSTRAP = ("pip", "setuptools", "wheel", "packaging")  # what building the locked sdists needs
NOT_LOCKED = {"sim-merlin", "horovod"}  # installed by steps 3 and 4, not from the lock
STAMP = ".sim-merlin-setup"


def log(message: str) -> None:
    print(f"[setup] {message}", flush=True)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(args))
    return subprocess.run(args, check=True, **kwargs)


def read_lock(path: Path) -> dict[str, str]:
    """Package name (normalised) -> full requirement line ``name==version``."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "==" not in line:
            sys.exit(f"{path}:{number}: expected 'name==version', got {raw!r}")
        name = line.split("==", 1)[0].strip()
        pins[normalise(name)] = line
    return pins


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def fingerprint(lock: Path, with_horovod: bool) -> str:
    digest = hashlib.sha256()
    for path in (lock, Path(__file__), ROOT / "scripts" / "build_horovod.py", ROOT / "pyproject.toml"):
        digest.update(path.read_bytes())
    digest.update(b"horovod" if with_horovod else b"-")
    return digest.hexdigest()


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed(python: Path) -> dict[str, str]:
    """Normalised name -> version of what pip sees installed in the venv of ``python``."""
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True,
    ).stdout
    return {
        normalise(line.split("==")[0]): line.split("==")[1]
        for line in out.splitlines()
        if "==" in line
    }


def setup(lock_name: str, venv: Path, with_horovod: bool) -> None:
    if sys.version_info[:2] != (3, 11):
        sys.exit(
            f"sim-merlin needs Python 3.11 (the Merlin 23.x stack has no wheels for newer "
            f"Pythons); this is {sys.version.split()[0]} at {sys.executable}."
        )
    lock = ROOT / "requirements" / f"{lock_name}.lock"
    pins = read_lock(lock)
    stamp = venv / STAMP
    expected = fingerprint(lock, with_horovod)
    python = venv_python(venv)
    if stamp.exists() and stamp.read_text().strip() == expected and python.exists():
        log(f"{venv.name} is up to date with {lock.relative_to(ROOT)}")
        build_kernels(python)
        return
    started = time.monotonic()
    if not python.exists():
        log(f"creating {venv}")
        run(sys.executable, "-m", "venv", str(venv))
    stamp.unlink(missing_ok=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "install", "--no-deps", *(pins[normalise(n)] for n in BOOTSTRAP))
    rest = [line for name, line in sorted(pins.items()) if name not in BOOTSTRAP]
    requirements = venv / "locked-requirements.txt"
    requirements.write_text("\n".join(rest) + "\n")
    run(*pip, "install", "--no-deps", "--no-build-isolation", "-r", str(requirements))
    stale = sorted(set(installed(python)) - set(pins) - NOT_LOCKED)
    if stale:
        run(*pip, "uninstall", "-y", *stale)
    run(*pip, "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT))
    if with_horovod:
        run(str(python), str(ROOT / "scripts" / "build_horovod.py"))
    run(*pip, "check")
    run(str(python), "-c", "import sim_merlin.tf_compat, merlin.models.tf, nvtabular")
    stamp.write_text(expected + "\n")
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    log(f"{venv.name} ready in {time.monotonic() - started:.0f} s ({size / 2**30:.2f} GiB)")
    build_kernels(python)


def build_kernels(python: Path) -> None:
    """The fused kernels (cached per source, TensorFlow and CPU: seconds when nothing changed)."""
    result = subprocess.run([str(python), "-m", "sim_merlin.kernels.build"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode == 0:
        log(f"fused kernels: {result.stdout.strip()}")
    else:
        log(f"fused kernels could not be built (exit status {result.returncode}; the compiler's "
            "message, if any, is above): the models use plain TensorFlow ops")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", choices=sorted(LOCKS), default="tf2.21")
    parser.add_argument("--venv", type=Path, help="venv directory (default: per lock, at the repo root)")
    horovod = parser.add_mutually_exclusive_group()
    horovod.add_argument("--with-horovod", dest="horovod", action="store_true", default=None)
    horovod.add_argument("--without-horovod", dest="horovod", action="store_false")
    args = parser.parse_args(argv)
    venv = (args.venv or ROOT / LOCKS[args.lock]).resolve()
    # Horovod is built for the primary lock by default; the 2.12.1 lock checks imports, blocks and
    # single-process training (the NGC containers that use TF 2.12 ship their own Horovod).
    with_horovod = args.horovod if args.horovod is not None else args.lock == "tf2.21"
    if shutil.which("cmake") is None and with_horovod:
        sys.exit("Horovod is built from source and needs cmake and g++: apt-get install cmake g++")
    os.environ.pop("PIP_REQUIRE_VIRTUALENV", None)
    setup(args.lock, venv, with_horovod)
    return 0


if __name__ == "__main__":
    sys.exit(main())
