"""sim-merlin: the Search-based Interest Model (SIM), DIN and DIEN as NVIDIA Merlin blocks.

Importing ``sim_merlin`` is cheap (it does not import TensorFlow) and installs
:mod:`sim_merlin.tf_compat`, which lets Merlin Models 23.x run on TensorFlow 2.12 .. 2.21: import
``sim_merlin`` before ``tensorflow`` and ``merlin.models.tf``.
"""
from sim_merlin import tf_compat as _tf_compat  # noqa: F401  (cheap: no TensorFlow import)

__version__ = "0.1.0"
