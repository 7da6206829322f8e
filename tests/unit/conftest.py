"""Preprocessed data sets shared by the model, training and command tests."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fit_helpers (tests import in importlib mode)

from fit_helpers import make_preprocessed  # noqa: E402
from sim_merlin.datasets.synthetic import SyntheticConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small preprocessed data set (history 20)."""
    return make_preprocessed(tmp_path_factory.mktemp("tiny"),
                             SyntheticConfig(users=150, items=1500, categories=15, seed=2), 20)


@pytest.fixture(scope="session")
def quality_dataset(tmp_path_factory):
    """Enough users (800, history 30) for a model to learn in one epoch."""
    return make_preprocessed(tmp_path_factory.mktemp("quality"),
                             SyntheticConfig(users=800, items=4000, categories=30, seed=21), 30)
