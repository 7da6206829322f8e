import pytest

from sim_merlin.datasets.synthetic import SyntheticConfig, generate
from sim_merlin.preprocessing.pipeline import PreprocessConfig, preprocess


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small preprocessed data set (history 20) made by the real pipeline."""
    root = tmp_path_factory.mktemp("tiny")
    generate(SyntheticConfig(users=150, items=1500, categories=15, seed=2), root / "raw")
    preprocess(PreprocessConfig(reviews=root / "raw" / "reviews_Books.json",
                                meta=root / "raw" / "meta_Books.json", output=root / "data",
                                max_sequence_length=20))
    return root / "data"
