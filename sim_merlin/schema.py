"""Schema conventions: how a Merlin schema tells SIM which column is what, without names.

Every column of the preprocessed data carries Merlin tags plus one of our role tags:

=========================  =================================================================
role (tag)                 columns
=========================  =================================================================
``Tags.TARGET``            ``label``: 1 = the user's real next behaviour, 0 = a sampled negative
``Tags.USER``              user features; ``user_id`` also has ``Tags.USER_ID``
``target_item``            features of the candidate item (``item_id`` has ``Tags.ITEM_ID``)
``history``                the user's earlier behaviours, one list column per item feature
``negative_history``       sampled behaviours of the same length (DIEN's auxiliary loss)
=========================  =================================================================

Item features pair up across roles by the property ``sim.feature`` (``item_id``,
``item_id_history`` and ``item_id_neg_history`` all say ``item_id``) and share one embedding table
through the domain name (``int_domain.name``). History columns are fixed-length lists
(``value_count`` min = max = the history length), left-padded with 0; the newest behaviour is the
last element (``sim.padding: left``, ``sim.newest: last``). Id 0 is padding in every domain.

Example::

    >>> s = sample_schema({"item_id": 100, "category_id": 7}, {"user_id": 50}, history_length=4)
    >>> s.select_by_tag(HISTORY).column_names
    ['item_id_history', 'category_id_history']
    >>> s["category_id_neg_history"].int_domain.name
    'category_id'
"""
from __future__ import annotations

from merlin.schema import ColumnSchema, Schema, Tags

TARGET_ITEM = "target_item"
HISTORY = "history"
NEGATIVE_HISTORY = "negative_history"
HISTORY_SUFFIX = "_history"
NEGATIVE_HISTORY_SUFFIX = "_neg_history"
LABEL = "label"
ITEM_ID = "item_id"
USER_ID = "user_id"
CATEGORY_ID = "category_id"


def _domain(name: str, cardinality: int) -> dict:
    return {"min": 0, "max": int(cardinality) - 1, "name": name}


def sample_schema(
    item_features: dict[str, int],
    user_features: dict[str, int],
    history_length: int,
) -> Schema:
    """The schema of preprocessed samples.

    ``item_features``: name -> cardinality (ids 0 .. cardinality - 1, 0 = padding), the item id
    first; ``user_features``: the same for user features, the user id first.
    """
    if not item_features or not user_features:
        raise ValueError("need at least one item feature (the item id) and one user feature")
    columns = [ColumnSchema(LABEL, dtype="int8", tags=[Tags.TARGET, Tags.BINARY_CLASSIFICATION])]
    for index, (name, cardinality) in enumerate(user_features.items()):
        tags = [Tags.USER, Tags.CATEGORICAL] + ([Tags.USER_ID, Tags.ID] if index == 0 else [])
        columns.append(
            ColumnSchema(name, dtype="int64", tags=tags,
                         properties={"domain": _domain(name, cardinality)})
        )
    roles = ((TARGET_ITEM, ""), (HISTORY, HISTORY_SUFFIX), (NEGATIVE_HISTORY, NEGATIVE_HISTORY_SUFFIX))
    for role, suffix in roles:
        for index, (name, cardinality) in enumerate(item_features.items()):
            tags = [Tags.ITEM, Tags.CATEGORICAL, role] + ([Tags.ITEM_ID, Tags.ID] if index == 0 else [])
            properties = {
                "domain": _domain(name, cardinality),
                "sim": {"role": role, "feature": name},
            }
            if suffix:
                tags += [Tags.SEQUENCE, Tags.LIST]
                properties["value_count"] = {"min": history_length, "max": history_length}
                properties["sim"].update(padding="left", newest="last")
            columns.append(
                ColumnSchema(name + suffix, dtype="int32", tags=tags, properties=properties,
                             is_list=bool(suffix), is_ragged=False)
            )
    return Schema(columns)
