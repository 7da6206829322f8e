"""Make Merlin Models 23.x import on TensorFlow 2.12 .. 2.21.

Merlin Models 23.12 was written against TensorFlow <= 2.12 and imports private modules that later
TensorFlow/Keras releases moved:

* TF 2.13+: Keras internals moved from ``keras.<x>`` to ``keras.src.<x>``.
* TF 2.14+: ``tensorflow.python.to_dlpack`` is gone (``tf.experimental.dlpack.to_dlpack``
  remains) and ``tensorflow.python.training.tracking`` became ``tensorflow.python.trackable``.
* TF 2.16+: ``tf.keras`` is Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set *before* TensorFlow is
  imported; Keras 2 then lives in the ``tf_keras`` package, and ``keras`` must resolve to it for
  Merlin Models and Horovod.

Importing this module (``import sim_merlin`` does) installs a small import hook that redirects the
old module paths to the new ones (the real module objects, never copies), so every class exists
exactly once, and prepares TensorFlow when ``merlin.models.tf`` is first imported. It does not
import TensorFlow itself. On TensorFlow 2.12 it changes nothing. In your own code,
``import sim_merlin`` before ``tensorflow`` and ``merlin.models.tf``.

Example::

    import sim_merlin  # noqa: F401  (before tensorflow and merlin.models.tf)
    import merlin.models.tf as mm
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

from sim_merlin.environment import tensorflow_version

MERLIN_MODELS_TF = "merlin.models.tf"

#: Old module path -> new module path, for TensorFlow internals Merlin Models imports.
_TF_MODULE_MOVES = {
    "tensorflow.python.training.tracking": "tensorflow.python.trackable",
    "tensorflow.python.training.tracking.data_structures": (
        "tensorflow.python.trackable.data_structures"
    ),
}


class TensorFlowTooNewError(ImportError):
    """Raised when TensorFlow was imported with Keras 3 before this module could select Keras 2."""


def _keras_target(name: str, tf_version: tuple[int, int]) -> str | None:
    """Where ``name`` (``keras`` or a ``keras.*`` module path) lives in this TensorFlow, if moved."""
    if tf_version < (2, 13):
        return None
    rest = name[len("keras") :]
    if tf_version < (2, 16):
        # Keras 2 is still the ``keras`` package: only internals that moved under ``keras.src``.
        if rest == "" or _module_exists(name):
            return None
        return "keras.src" + rest
    # Keras 2 is the ``tf_keras`` package. Old ``keras.<x>`` paths name implementation modules,
    # which now live under ``tf_keras.src`` (aliasing to the public ``tf_keras.<x>`` would break
    # ``from keras.utils import layer_utils``, which resolves submodules by the module's own name).
    if rest == "":
        return "tf_keras"
    if _module_exists("tf_keras.src" + rest):
        return "tf_keras.src" + rest
    return "tf_keras" + rest


def _module_exists(name: str) -> bool:
    """Whether ``name`` can be imported from disk (asks the path finder only, never this hook)."""
    if name in sys.modules:
        return True
    parent, _, child = name.rpartition(".")
    if not parent:
        return importlib.machinery.PathFinder.find_spec(name) is not None
    try:
        search_path = getattr(importlib.import_module(parent), "__path__", None)
    except ImportError:
        return False
    if search_path is None:
        return False
    return importlib.machinery.PathFinder.find_spec(name, search_path) is not None


class _AliasLoader(importlib.abc.Loader):
    """Loads an alias by returning the already imported real module."""

    def __init__(self, target: str):
        self.target = target
        self._real_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system stamped the alias spec on the real module; give it its own back.
        module.__spec__ = self._real_spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Redirects module paths that moved between TensorFlow releases, and prepares TensorFlow
    right before ``merlin.models.tf`` is imported."""

    def __init__(self, tf_version: tuple[int, int]):
        self.tf_version = tf_version

    def find_spec(self, fullname, path=None, target=None):
        if fullname == MERLIN_MODELS_TF:
            _prepare_tensorflow(self.tf_version)
            return None  # the normal import goes on
        destination = None
        if fullname == "keras" or fullname.startswith("keras."):
            destination = _keras_target(fullname, self.tf_version)
        elif self.tf_version >= (2, 14):
            destination = _TF_MODULE_MOVES.get(fullname)
        if destination is None or destination == fullname:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(destination))


def _select_legacy_keras(tf_version: tuple[int, int]) -> None:
    """Ask for Keras 2 before TensorFlow loads (it reads the variable at import)."""
    if tf_version >= (2, 16) and "tensorflow" not in sys.modules:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"


def _check_keras(tf_version: tuple[int, int]) -> None:
    """Fail clearly if TensorFlow was already loaded with Keras 3 (Merlin Models needs Keras 2)."""
    if tf_version < (2, 16):
        return
    if "tensorflow" in sys.modules and not getattr(
        sys.modules["tensorflow"], "_tf_uses_legacy_keras", True
    ):
        raise TensorFlowTooNewError(
            "TensorFlow was imported before sim_merlin with Keras 3 as tf.keras, but Merlin Models "
            "needs Keras 2 (the tf_keras package). Set TF_USE_LEGACY_KERAS=1 in the environment, "
            "or import sim_merlin before tensorflow."
        )
    keras = sys.modules.get("keras")
    if keras is not None and not keras.__name__.startswith("tf_keras"):
        raise TensorFlowTooNewError(
            f"Keras {getattr(keras, '__version__', '?')} (Keras 3) was imported before sim_merlin; "
            "Merlin Models and Horovod need `keras` to be Keras 2 (tf_keras). Import sim_merlin "
            "first."
        )


def _prepare_tensorflow(tf_version: tuple[int, int]) -> None:
    """What Merlin Models needs of TensorFlow itself: Keras 2, and attributes that moved."""
    _check_keras(tf_version)
    if tf_version < (2, 14):
        return
    import tensorflow as tf
    import tensorflow.python as tf_python

    if not hasattr(tf_python, "to_dlpack"):
        tf_python.to_dlpack = tf.experimental.dlpack.to_dlpack


def install() -> tuple[int, int] | None:
    """Install the import redirections for the installed TensorFlow (idempotent, cheap: it does
    not import TensorFlow; TensorFlow is prepared when ``merlin.models.tf`` is first imported).

    Returns the (major, minor) TensorFlow version, or ``None`` when TensorFlow is not installed.
    """
    version = tensorflow_version()
    if version is None or version < (2, 13):
        return version
    _select_legacy_keras(version)
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder(version))
    if MERLIN_MODELS_TF in sys.modules:
        _prepare_tensorflow(version)
    return version


INSTALLED_FOR = install()

__all__ = ["INSTALLED_FOR", "TensorFlowTooNewError", "install"]
