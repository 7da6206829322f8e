"""The committed schema of the built-in default data set is what the pipeline writes."""
from pathlib import Path

import pytest
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

from sim_merlin.datasets.synthetic import SyntheticConfig, generate
from sim_merlin.preprocessing.pipeline import PreprocessConfig, preprocess

ROOT = Path(__file__).resolve().parents[3]


def _columns(directory: Path) -> dict:
    """Column -> (dtype, tags as a set, properties, list shape): tag order is not meaningful."""
    schema = TensorflowMetadata.from_proto_text_file(str(directory)).to_merlin_schema()
    return {
        c.name: (str(c.dtype), {str(t) for t in c.tags}, c.properties, c.is_list, c.is_ragged)
        for c in schema
    }


@pytest.mark.slow
def test_committed_default_schema_matches_a_fresh_run(tmp_path):
    generate(SyntheticConfig(), tmp_path / "raw")
    out = tmp_path / "processed"
    preprocess(PreprocessConfig(reviews=tmp_path / "raw" / "reviews_Books.json",
                                meta=tmp_path / "raw" / "meta_Books.json", output=out))
    committed = _columns(ROOT / "schemas" / "default")
    assert len(committed) == 8
    for split in ("train", "test"):
        assert _columns(out / split) == committed, (
            f"{split}/schema.pbtxt differs from schemas/default/schema.pbtxt: if the change is "
            "intended, copy the new file there (scripts/quickstart.sh writes data/processed)"
        )
