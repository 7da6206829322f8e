"""The compatibility layer: Merlin Models 23.x must import and train on both locked TensorFlows."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import sim_merlin.tf_compat as tf_compat
from sim_merlin.environment import tensorflow_version

pytestmark = pytest.mark.compat_lock

TF = tensorflow_version()


def test_installed_for_the_tensorflow_in_this_environment():
    assert tf_compat.INSTALLED_FOR == TF
    hooks = [f for f in sys.meta_path if isinstance(f, tf_compat._MovedModuleFinder)]
    if TF >= (2, 13):
        assert len(hooks) == 1 and sys.meta_path[0] is hooks[0]
        tf_compat.install()  # idempotent
        assert sum(isinstance(f, tf_compat._MovedModuleFinder) for f in sys.meta_path) == 1
    else:
        assert hooks == []  # nothing to fix on TF 2.12: a no-op


def test_merlin_models_imports_and_keras_2_is_in_use():
    import merlin.models.tf as mm
    import tensorflow as tf

    assert tf.__version__.startswith(f"{TF[0]}.{TF[1]}.")
    dense_module = tf.keras.layers.Dense.__module__
    assert issubclass(mm.Model, tf.keras.Model)
    if TF >= (2, 16):
        assert dense_module.startswith("tf_keras.")
        import keras

        assert keras.__name__ == "tf_keras"
    else:
        assert dense_module.startswith("keras.")


@pytest.mark.skipif(TF < (2, 13), reason="no module moved before TF 2.13")
def test_moved_modules_are_the_real_modules_not_copies():
    import importlib

    package = "tf_keras" if TF >= (2, 16) else "keras"
    old = importlib.import_module("keras.engine.base_layer")
    new = importlib.import_module(f"{package}.src.engine.base_layer")
    assert old is new
    assert new.__spec__.name == f"{package}.src.engine.base_layer"
    from keras.utils import layer_utils  # resolves through the moved package

    assert layer_utils is importlib.import_module(f"{package}.src.utils.layer_utils")
    if TF >= (2, 14):
        import tensorflow as tf
        from tensorflow.python import to_dlpack
        from tensorflow.python.training.tracking.data_structures import ListWrapper

        assert to_dlpack is tf.experimental.dlpack.to_dlpack
        assert ListWrapper.__module__ == "tensorflow.python.trackable.data_structures"


@pytest.mark.skipif(TF < (2, 16), reason="Keras 3 is tf.keras only from TF 2.16")
def test_tensorflow_imported_first_with_keras_3_gets_a_clear_error():
    code = "import tensorflow\nimport sim_merlin\nimport merlin.models.tf\n"
    env = {"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "TF_USE_LEGACY_KERAS=1" in result.stderr
    assert "import sim_merlin before tensorflow" in result.stderr


def test_importing_sim_merlin_does_not_import_tensorflow():
    code = "import sys, sim_merlin; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_merlin_model_trains_saves_and_reloads_with_identical_predictions(tmp_path):
    """A short end-to-end run of Merlin's own API: dataset -> schema -> Loader -> fit -> save."""
    import merlin.models.tf as mm
    import tensorflow as tf
    from merlin.dataloader.tensorflow import Loader
    from merlin.io import Dataset
    from merlin.schema import ColumnSchema, Schema, Tags

    rng = np.random.default_rng(0)
    n = 512
    user = rng.integers(1, 20, n)
    item = rng.integers(1, 50, n)
    label = ((user + item) % 3 == 0).astype(np.int64)
    frame = pd.DataFrame({"user": user, "item": item, "label": label})
    schema = Schema(
        [
            ColumnSchema("user", dtype="int64", tags=[Tags.CATEGORICAL, Tags.USER_ID],
                         properties={"domain": {"min": 0, "max": 19}}),
            ColumnSchema("item", dtype="int64", tags=[Tags.CATEGORICAL, Tags.ITEM_ID],
                         properties={"domain": {"min": 0, "max": 49}}),
            ColumnSchema("label", dtype="int64", tags=[Tags.TARGET, Tags.BINARY_CLASSIFICATION]),
        ]
    )
    dataset = Dataset(frame, schema=schema)
    tf.keras.utils.set_random_seed(1)
    model = mm.Model(
        mm.InputBlockV2(schema, categorical=mm.Embeddings(schema.select_by_tag(Tags.CATEGORICAL), dim=8)),
        mm.MLPBlock([16]),
        mm.BinaryOutput("label"),
    )
    model.compile(optimizer="adam", run_eagerly=False, metrics=[tf.keras.metrics.AUC()])
    loader = Loader(dataset, batch_size=64, shuffle=False)
    history = model.fit(loader, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    batch, _ = next(iter(Loader(dataset, batch_size=64, shuffle=False)))
    before = model(batch, training=False)
    model.save(tmp_path / "model")
    reloaded = tf.keras.models.load_model(tmp_path / "model")
    after = reloaded(batch, training=False)
    np.testing.assert_allclose(np.asarray(before), np.asarray(after), rtol=1e-6)
    assert np.asarray(before).shape == (64, 1)
