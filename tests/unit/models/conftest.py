import pytest


@pytest.fixture
def fit_save_reload(tmp_path):
    """Fit ``model`` for a few steps on a preprocessed split, save it, reload it, and return the
    predictions of both on one batch (original, reloaded)."""
    import numpy as np
    import tensorflow as tf
    from merlin.dataloader.tensorflow import Loader
    from merlin.io import Dataset

    def run(model, split_dir, steps=2, optimizer="adam"):
        train = Dataset(str(split_dir), engine="parquet")
        model.compile(optimizer=optimizer)
        history = model.fit(Loader(train, batch_size=64, shuffle=True), epochs=1,
                            steps_per_epoch=steps, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        batch, _ = next(iter(Loader(train, batch_size=32, shuffle=False)))
        before = model.predict(batch, verbose=0)
        model.save(tmp_path / "saved_model")
        reloaded = tf.keras.models.load_model(tmp_path / "saved_model")
        return before, reloaded.predict(batch, verbose=0)

    return run
