"""Trained briefly on the built-in data, every model clearly beats a popularity baseline."""
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from merlin.dataloader.tensorflow import Loader
from merlin.io import Dataset

from sim_merlin.models.dien import DIENModel
from sim_merlin.models.din import DINModel
from sim_merlin.models.sim import SIMModel
from sim_merlin.training.metrics import roc_auc


def _read(directory, columns):
    return pd.concat([pd.read_parquet(p, columns=columns) for p in sorted(directory.glob("*.parquet"))])


def _popularity_auc(data) -> float:
    """Score = the item's number of positive training samples."""
    train = _read(data / "train", ["item_id", "label"])
    counts = train[train.label == 1]["item_id"].value_counts()
    test = _read(data / "test", ["item_id", "label"])
    return roc_auc(test["label"].to_numpy(), test["item_id"].map(counts).fillna(0).to_numpy())


@pytest.mark.slow
@pytest.mark.parametrize("factory,options", [
    (SIMModel, {"top_k": 10}),
    (DINModel, {}),
    (DIENModel, {}),
])
def test_models_beat_the_popularity_baseline(quality_dataset, factory, options):
    data = quality_dataset
    train = Dataset(str(data / "train"), engine="parquet")
    test = Dataset(str(data / "test"), engine="parquet")
    tf.keras.utils.set_random_seed(7)
    model = factory(train.schema, embedding_dim=8, short_length=10, **options)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.005))
    model.fit(Loader(train, batch_size=512, shuffle=True), epochs=1, verbose=0)
    labels, scores = [], []
    for batch, target in Loader(test, batch_size=1024, shuffle=False):
        scores.append(model(batch).numpy().ravel())
        labels.append(np.asarray(target).ravel())
    auc = roc_auc(np.concatenate(labels), np.concatenate(scores))
    baseline = _popularity_auc(data)
    print(f"{factory.__name__}: test AUC {auc:.4f}, popularity baseline {baseline:.4f}")
    assert auc > baseline + 0.1
