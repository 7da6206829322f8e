"""SIM's search units inside another Merlin model: ESU output into a DLRM-style top MLP.

(Merlin Models 23.12's ``Cross`` layer leaves ``output_x0`` out of its ``get_config``, so a reloaded
``CrossBlock(depth >= 2)`` crosses its later layers with their own input instead of x0: a
different network with the same weights, whose predictions drift further apart with training.
``CrossBlock(1)`` has no later layer and reloads exactly.)"""
import merlin.models.tf as mm
import numpy as np
import pytest
import tensorflow as tf
from merlin.io import Dataset

from sim_merlin.blocks.exact_search import ExactSearchUnit
from sim_merlin.blocks.inputs import BehaviourEmbeddings
from sim_merlin.blocks.search import GeneralSearchUnit
from sim_merlin.blocks.serialization import SchemaConfigMixin

pytestmark = pytest.mark.compat_lock


@tf.keras.utils.register_keras_serializable(package="sim_merlin_tests")
class SearchedInterest(SchemaConfigMixin, mm.Block):
    """What a user would write: [ESU(GSU(long history)) | target | user] as one feature vector."""

    def __init__(self, schema, **kwargs):
        super().__init__(**kwargs)
        self._schema = schema
        self.embeddings = BehaviourEmbeddings(schema, embedding_dim=8, short_length=5)
        self.search = GeneralSearchUnit("hard", top_k=5)
        self.exact = ExactSearchUnit("multihead", heads=2)

    def call(self, inputs):
        e = self.embeddings(inputs)
        selected, mask = self.search(e["target"], e["long"], e["long_mask"],
                                     target_category=e["target_search_key"],
                                     history_categories=e["long_search_keys"])
        return tf.concat([self.exact(e["target"], selected, mask), e["target"], e["user"]], -1)

    def get_config(self):
        return self._config_with_schema(super().get_config())


def test_esu_features_train_in_a_merlin_model_and_reload_exactly(tiny_dataset, fit_save_reload):
    schema = Dataset(str(tiny_dataset / "train"), engine="parquet").schema
    tf.keras.utils.set_random_seed(5)
    model = mm.Model(SearchedInterest(schema), mm.MLPBlock([32, 16]), mm.BinaryOutput("label"))
    before, after = fit_save_reload(model, tiny_dataset / "train", steps=3)
    np.testing.assert_array_equal(after, before)
    names = {v.name for v in model.trainable_variables}
    assert any("item_id_embeddings" in n for n in names) and any("query" in n for n in names)


def test_esu_features_feed_a_dcn_cross_tower(tiny_dataset, fit_save_reload):
    """Trains and reloads with identical predictions (one cross layer: see the module note)."""
    schema = Dataset(str(tiny_dataset / "train"), engine="parquet").schema
    tf.keras.utils.set_random_seed(6)
    model = mm.Model(SearchedInterest(schema), mm.CrossBlock(1), mm.MLPBlock([16]),
                     mm.BinaryOutput("label"))
    before, after = fit_save_reload(model, tiny_dataset / "train", steps=3)
    np.testing.assert_array_equal(after, before)
