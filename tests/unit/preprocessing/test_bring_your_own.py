"""Extra item and user features flow through preprocessing with no code changes."""
import ast
import json

import numpy as np
import pandas as pd
import pytest
from merlin.io import Dataset
from merlin.schema import Tags

from sim_merlin import schema as conventions
from sim_merlin.datasets.synthetic import SyntheticConfig, generate
from sim_merlin.preprocessing.pipeline import PreprocessConfig, preprocess


def _country(reviewer: str) -> str:
    return ["DE", "FR", "US", "JP"][sum(map(ord, reviewer)) % 4]


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    raw = tmp_path_factory.mktemp("byo")
    generate(SyntheticConfig(users=200, items=2000, categories=20, seed=3, with_brand=True), raw)
    # A user feature as users would bring it: a field of every review line.
    lines = (raw / "reviews_Books.json").read_text().splitlines()
    with open(raw / "reviews_Books.json", "w") as handle:
        for line in lines:
            record = json.loads(line)
            record["country"] = _country(record["reviewerID"])
            handle.write(json.dumps(record) + "\n")
    out = raw / "out"
    summary = preprocess(PreprocessConfig(
        reviews=raw / "reviews_Books.json", meta=raw / "meta_Books.json", output=out,
        max_sequence_length=10, item_features=("brand",), user_features=("country",)))
    return raw, out, summary


def _vocabulary(out, column):
    path = out / "workflow" / "categories" / f"unique.{column}.parquet"
    values = pd.read_parquet(path)[column]
    return dict(zip(values.index, values))


def test_extra_features_get_the_same_tags_and_pairing(byo):
    _, out, summary = byo
    schema = Dataset(str(out / "train"), engine="parquet").schema
    assert schema.select_by_tag(conventions.TARGET_ITEM).column_names == [
        "item_id", "category_id", "brand"]
    assert schema.select_by_tag(conventions.HISTORY).column_names == [
        "item_id_history", "category_id_history", "brand_history"]
    assert schema.select_by_tag(conventions.NEGATIVE_HISTORY).column_names == [
        "item_id_neg_history", "category_id_neg_history", "brand_neg_history"]
    assert schema.select_by_tag(Tags.USER).column_names == ["user_id", "country"]
    for name in ("brand", "brand_history", "brand_neg_history"):
        assert schema[name].int_domain.name == "brand"
        assert schema[name].properties["sim"]["feature"] == "brand"
    assert schema["country"].int_domain.max == summary["cardinalities"]["country"] - 1


def test_extra_feature_values_belong_to_their_items_and_users(byo):
    raw, out, _ = byo
    brand_of = {}
    for line in (raw / "meta_Books.json").read_text().splitlines():
        record = ast.literal_eval(line)
        brand_of[record["asin"]] = record["brand"]
    items, brands = _vocabulary(out, "item_id"), _vocabulary(out, "brand")
    users, countries = _vocabulary(out, "user_id"), _vocabulary(out, "country")
    frame = pd.read_parquet(next((out / "train").glob("*.parquet")))
    assert len(frame) > 1000
    for column, feature in (("item_id", "brand"), ("item_id_history", "brand_history"),
                            ("item_id_neg_history", "brand_neg_history")):
        ids = np.stack(frame[column].to_numpy()) if frame[column].dtype == object else frame[column].to_numpy()
        values = np.stack(frame[feature].to_numpy()) if frame[feature].dtype == object else frame[feature].to_numpy()
        filled = ids > 0
        decoded_items = [items[i] for i in ids[filled]]
        decoded_brands = [brands[b] for b in values[filled]]
        assert decoded_brands == [brand_of[a] for a in decoded_items], column
        assert (values[~filled] == 0).all()
    got = frame["country"].map(countries).tolist()
    assert got == [_country(users[u]) for u in frame["user_id"]]
