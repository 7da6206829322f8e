import numpy as np
import pytest
import tensorflow as tf
from merlin.dataloader.tensorflow import Loader
from merlin.io import Dataset

from sim_merlin.models.dien import DIENBlock, DIENModel
from sim_merlin.models.din import DINBlock, DINModel
from sim_merlin.schema import sample_schema

pytestmark = pytest.mark.compat_lock


def _dense_parameters(variables):
    return sum(int(np.prod(v.shape)) for v in variables if "embeddings" not in v.name)


@pytest.mark.parametrize("block,expected", [(DINBlock, 32_641), (DIENBlock, 193_811)])
def test_reference_compatible_parameter_counts(block, expected):
    schema = sample_schema({"item_id": 1_000, "category_id": 50}, {"user_id": 300}, 100)
    layer = block(schema, embedding_dim=16, reference_compatible=True)
    rng = np.random.default_rng(0)
    batch = {name: tf.constant(rng.integers(1, 50, (4, 100) if "history" in name else (4,)))
             for name in schema.column_names if name != "label"}
    if block is DIENBlock:  # the auxiliary network is built when a loss is computed
        layer(batch, targets=tf.constant([1, 0, 1, 0]), training=True)
    else:
        layer(batch)
    assert _dense_parameters(layer.trainable_variables) == expected


@pytest.mark.parametrize("factory,options", [
    (DINModel, {}), (DINModel, {"reference_compatible": True}),
    (DIENModel, {}), (DIENModel, {"reference_compatible": True}),
])
def test_one_step_fit_save_reload_identical_predictions(tiny_dataset, tmp_path, factory, options):
    train = Dataset(str(tiny_dataset / "train"), engine="parquet")
    tf.keras.utils.set_random_seed(4)
    model = factory(train.schema, embedding_dim=8, short_length=5, **options)
    model.compile(optimizer="adam")
    history = model.fit(Loader(train, batch_size=64, shuffle=True), epochs=1, steps_per_epoch=2,
                        verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    batch, _ = next(iter(Loader(train, batch_size=32, shuffle=False)))
    before = model(batch).numpy()
    model.save(tmp_path / "model")
    reloaded = tf.keras.models.load_model(tmp_path / "model")
    np.testing.assert_allclose(reloaded(batch).numpy(), before, rtol=1e-5, atol=1e-6)
