import numpy as np
import pytest
import tensorflow as tf
from merlin.dataloader.tensorflow import Loader
from merlin.io import Dataset

from sim_merlin.models.sim import SIMBlock, SIMModel
from sim_merlin.schema import sample_schema

pytestmark = pytest.mark.compat_lock


def _dense_parameters(variables):
    return sum(int(np.prod(v.shape)) for v in variables if "embeddings" not in v.name)


def test_reference_compatible_sim_has_the_reference_parameter_count():
    # The reference's Amazon Books setting: E=16, history 100 split 90/10, k=50.
    schema = sample_schema({"item_id": 1_000, "category_id": 50}, {"user_id": 300}, 100)
    block = SIMBlock(schema, embedding_dim=16, reference_compatible=True)
    rng = np.random.default_rng(0)
    batch = {name: tf.constant(rng.integers(1, 50, (4, 100) if "history" in name else (4,)))
             for name in schema.column_names if name != "label"}
    block(batch, targets=tf.constant([1, 0, 1, 0]), training=True)
    assert _dense_parameters(block.trainable_variables) == 223_212
    assert block.search.mode == "soft" and block.exact_search.attention == "dot"


@pytest.mark.parametrize("options", [
    {},
    {"search_mode": "hard", "esu_heads": 2},
    {"reference_compatible": True},
])
def test_one_step_fit_save_reload_identical_predictions(tiny_dataset, tmp_path, options):
    train = Dataset(str(tiny_dataset / "train"), engine="parquet")
    tf.keras.utils.set_random_seed(3)
    model = SIMModel(train.schema, embedding_dim=8, short_length=5, top_k=6, **options)
    model.compile(optimizer="adam")
    history = model.fit(Loader(train, batch_size=64, shuffle=True), epochs=1, steps_per_epoch=2,
                        verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    batch, _ = next(iter(Loader(train, batch_size=32, shuffle=False)))
    before = model(batch).numpy()
    assert before.shape == (32, 1) and ((before > 0) & (before < 1)).all()
    model.save(tmp_path / "sim")
    reloaded = tf.keras.models.load_model(tmp_path / "sim")
    np.testing.assert_allclose(reloaded(batch).numpy(), before, rtol=1e-5, atol=1e-6)
