"""sim-merlin: the Search-based Interest Model (SIM), DIN and DIEN as NVIDIA Merlin blocks.

Importing ``sim_merlin`` is cheap: it does not import TensorFlow. Modules that build models import
:mod:`sim_merlin.tf_compat` first, which lets Merlin Models 23.x run on TensorFlow 2.12 .. 2.21.
"""
import os as _os

from sim_merlin.environment import tensorflow_version as _tensorflow_version

__version__ = "0.1.0"

# Keras 2 (tf_keras) must be chosen before TensorFlow is imported on TF >= 2.16; setting it here
# lets `import sim_merlin; import tensorflow` work in any order a user writes it.
if (_tensorflow_version() or (0, 0)) >= (2, 16):
    _os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
