"""Fused CPU kernels (C++ TensorFlow ops) for the hot loops of the models.

The ops are compiled from the sources in this package against the installed TensorFlow the first
time they are needed (``scripts/setup_env.py`` does it ahead of time; ``python -m
sim_merlin.kernels.build`` does it by hand) and cached per source, TensorFlow and CPU. Without a
C++ compiler, or with ``SIM_MERLIN_FUSED_KERNELS=0``, every block takes its plain TensorFlow path,
which computes the same values.
"""
