"""Preprocessed data sets shared by the model, training and command tests."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fit_helpers (tests import in importlib mode)

from sim_merlin.datasets.synthetic import SyntheticConfig, generate
from sim_merlin.preprocessing.pipeline import PreprocessConfig, preprocess


def make_preprocessed(root, synthetic: SyntheticConfig, history_length: int):
    """Generate built-in data under ``root`` and preprocess it with the real pipeline."""
    generate(synthetic, root / "raw")
    preprocess(PreprocessConfig(reviews=root / "raw" / "reviews_Books.json",
                                meta=root / "raw" / "meta_Books.json", output=root / "data",
                                max_sequence_length=history_length))
    return root / "data"


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
