"""NVTabular operator that turns grouped user sequences into SIM samples.

:class:`BuildSamples` runs after NVTabular's ``Groupby`` (one row per user, list columns in time
order) and emits one row per sample with the columns of :func:`sim_merlin.schema.sample_schema`.
The arithmetic lives in :mod:`sim_merlin.preprocessing.samples`; this module adapts it to
dataframes and NVTabular's schema machinery.

Rows of a partition come out in a seeded pseudo-random order (users are already spread over
partitions by the hash shuffle that precedes ``Groupby``), so training batches are not sorted by
user, and the order is reproducible.

Example::

    >>> import numpy as np, pandas as pd
    >>> from sim_merlin.preprocessing.samples import NegativeSampler
    >>> op = BuildSamples("test", history_length=3, seed=0,
    ...                   sampler=NegativeSampler(np.array([3, 4]), {"category_id": np.arange(5)}),
    ...                   item_cardinalities={"item_id": 5, "category_id": 5},
    ...                   user_cardinalities={"user_id": 9})
    >>> grouped = pd.DataFrame({"user_id": [4], "item_id_list": [[3, 4, 3]],
    ...                         "category_id_list": [[3, 4, 3]], "time_list": [[1, 2, 3]]})
    >>> op.transform(None, grouped)["label"].tolist()
    [1, 0]
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from merlin.dag import ColumnSelector
from merlin.schema import Schema
from nvtabular.ops import Operator

from sim_merlin.preprocessing.samples import (
    NegativeSampler,
    build_samples,
    counter_uniform,
    drop_repeated_behaviours,
)
from sim_merlin.schema import sample_schema

LIST_SUFFIX = "_list"
LAST_SUFFIX = "_last"
_USERS_PER_BLOCK = 2048
_STREAM_ORDER = 0x0DE5


def _flatten(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    lengths = column.map(len).to_numpy(dtype=np.int64)
    if len(column) == 0:
        return lengths, np.zeros(0, dtype=np.int64)
    return lengths, np.concatenate([np.asarray(v) for v in column.to_numpy()])


class BuildSamples(Operator):
    """Grouped user sequences -> labelled samples with histories and negative histories.

    Parameters
    ----------
    split: ``"train"`` (every position with a prior behaviour except the last) or ``"test"``
        (the last behaviour of each user).
    history_length: kept history length; histories are left-padded to it.
    seed: seeds negatives and row order (counter-based, partition-independent).
    sampler: the interaction-weighted pool of negatives and the features of every item id.
    item_cardinalities / user_cardinalities: feature name -> cardinality, item and user id first.
    keep_duplicates: keep exact duplicate reviews (same user, item, time) as separate behaviours,
        as the reference does (default: drop them).
    exclude_positive_negatives: redraw a negative target equal to the positive one.
    min_history: a training sample needs at least this many earlier behaviours.
    """

    def __init__(
        self,
        split: str,
        history_length: int,
        seed: int,
        sampler: NegativeSampler,
        item_cardinalities: dict[str, int],
        user_cardinalities: dict[str, int],
        keep_duplicates: bool = False,
        exclude_positive_negatives: bool = False,
        min_history: int = 1,
    ):
        super().__init__()
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if history_length < 1:
            raise ValueError(f"history_length must be >= 1, got {history_length}")
        self.split = split
        self.history_length = int(history_length)
        self.seed = int(seed)
        self.sampler = sampler
        self.item_cardinalities = dict(item_cardinalities)
        self.user_cardinalities = dict(user_cardinalities)
        self.keep_duplicates = keep_duplicates
        self.exclude_positive_negatives = exclude_positive_negatives
        self.min_history = int(min_history)

    @property
    def item_features(self) -> list[str]:
        return list(self.item_cardinalities)

    @property
    def user_features(self) -> list[str]:
        return list(self.user_cardinalities)

    def input_columns(self) -> list[str]:
        user_id, *user_extra = self.user_features
        return (
            [user_id]
            + [name + LAST_SUFFIX for name in user_extra]
            + [name + LIST_SUFFIX for name in self.item_features]
            + ["time" + LIST_SUFFIX]
        )

    def output_schema(self) -> Schema:
        return sample_schema(self.item_cardinalities, self.user_cardinalities, self.history_length)

    def column_mapping(self, col_selector):
        inputs = self.input_columns()
        return {name: inputs for name in self.output_schema().column_names}

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None):
        return self.output_schema()

    def output_column_names(self, col_selector: ColumnSelector) -> ColumnSelector:
        return ColumnSelector(self.output_schema().column_names)

    def transform(self, col_selector, df: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in self.input_columns() if c not in df.columns]
        if missing:
            raise KeyError(f"BuildSamples needs grouped columns {missing}; got {list(df.columns)}")
        blocks = [
            self._transform_block(df.iloc[start : start + _USERS_PER_BLOCK])
            for start in range(0, max(len(df), 1), _USERS_PER_BLOCK)
        ]
        out = pd.concat(blocks, ignore_index=True) if len(blocks) > 1 else blocks[0]
        return out[self.output_schema().column_names]

    def _transform_block(self, df: pd.DataFrame) -> pd.DataFrame:
        user_id, *user_extra = self.user_features
        users = df[user_id].to_numpy(dtype=np.int64)
        lengths, items = _flatten(df[self.item_features[0] + LIST_SUFFIX])
        flat = {self.item_features[0]: items}
        for name in self.item_features[1:]:
            flat[name] = _flatten(df[name + LIST_SUFFIX])[1]
        if not self.keep_duplicates:
            times = _flatten(df["time" + LIST_SUFFIX])[1]
            keep, lengths = drop_repeated_behaviours(lengths, items, times)
            flat = {name: values[keep] for name, values in flat.items()}
        flat = {name: values.astype(np.int32) for name, values in flat.items()}
        samples = build_samples(
            users, lengths, flat, self.split, self.history_length, self.sampler, self.seed,
            exclude_positive=self.exclude_positive_negatives, min_history=self.min_history,
        )
        row_user = samples.pop("user_row")
        # A reproducible shuffle of the block's rows: sort by a hash of (user, row).
        order = np.argsort(
            counter_uniform(self.seed, users[row_user], np.arange(len(row_user)), _STREAM_ORDER),
            kind="stable",
        )
        columns = {"label": samples["label"][order], user_id: users[row_user][order]}
        for name in user_extra:
            columns[name] = df[name + LAST_SUFFIX].to_numpy(dtype=np.int64)[row_user][order]
        for name, values in samples.items():
            if name == "label":
                continue
            values = values[order]
            columns[name] = list(values) if values.ndim == 2 else values
        return pd.DataFrame(columns)
