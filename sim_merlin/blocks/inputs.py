"""Schema-driven inputs: embed user, target item, histories; split long and short; derive masks.

:class:`BehaviourEmbeddings` reads the roles of :mod:`sim_merlin.schema` from a Merlin schema, so
it needs no column names. Item features are embedded with one table per feature, shared by the
target, the history and the negative history (the schema's domain names say so); each user
feature has its own table. Tables have ``domain.max + 1`` rows initialised uniformly in
``+-sqrt(1 / rows)`` as in the reference; padding (id 0) is zeroed by the mask.

The history (length ``L``, left-padded, newest last) is split into the **long** part, the oldest
``L - short_length`` slots, and the **short** part, the newest ``short_length``.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.schema import sample_schema
    >>> schema = sample_schema({"item_id": 50, "category_id": 6}, {"user_id": 9}, history_length=5)
    >>> inputs = BehaviourEmbeddings(schema, embedding_dim=4, short_length=2)
    >>> batch = {"user_id": tf.constant([1, 2]), "item_id": tf.constant([7, 8]),
    ...          "category_id": tf.constant([3, 4]),
    ...          "item_id_history": tf.constant([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]]),
    ...          "category_id_history": tf.constant([[0, 0, 3, 3, 4], [3, 3, 3, 3, 3]]),
    ...          "item_id_neg_history": tf.constant([[0, 0, 9, 9, 9], [9, 9, 9, 9, 9]]),
    ...          "category_id_neg_history": tf.constant([[0, 0, 5, 5, 5], [5, 5, 5, 5, 5]])}
    >>> out = inputs(batch)
    >>> out["long"].shape.as_list(), out["short"].shape.as_list(), out["target"].shape.as_list()
    ([2, 3, 8], [2, 2, 8], [2, 8])
"""
from __future__ import annotations

import math

import sim_merlin.tf_compat  # noqa: F401
import merlin.models.tf as mm
import tensorflow as tf
from merlin.schema import Schema, Tags

from sim_merlin import schema as conventions
from sim_merlin.blocks.sequence import left_pad
from sim_merlin.blocks.serialization import SchemaConfigMixin
from sim_merlin.blocks.table_reads import AnnouncedEmbedding
from sim_merlin.kernels import embedding_rows, model_ops


class SchemaMismatchError(ValueError):
    """The schema's tags do not describe what the model needs."""


def _feature(column) -> str:
    sim = column.properties.get("sim") or {}
    if "feature" in sim:
        return sim["feature"]
    for suffix in (conventions.NEGATIVE_HISTORY_SUFFIX, conventions.HISTORY_SUFFIX):
        if column.name.endswith(suffix):
            return column.name[: -len(suffix)]
    return column.name


def _domain(column) -> tuple[str, int]:
    domain = column.int_domain
    if domain is None or domain.max is None:
        raise SchemaMismatchError(f"column {column.name!r} has no int_domain.max (cardinality)")
    return domain.name or _feature(column), int(domain.max) + 1


def _history_length(column) -> int:
    value_count = column.properties.get("value_count") or {}
    if value_count.get("max") is None or value_count.get("min") != value_count.get("max"):
        raise SchemaMismatchError(
            f"history column {column.name!r} must have a fixed length (value_count min = max)"
        )
    return int(value_count["max"])


class SequenceLayout:
    """Which columns play which role, checked for consistency. Built from a schema."""

    def __init__(self, schema: Schema, search_feature: str | None = None):
        self.user = schema.select_by_tag(Tags.USER).column_names
        self.target = schema.select_by_tag(conventions.TARGET_ITEM).column_names
        self.history = schema.select_by_tag(conventions.HISTORY).column_names
        self.negative = schema.select_by_tag(conventions.NEGATIVE_HISTORY).column_names
        for role, names in (("user", self.user), ("target_item", self.target),
                            ("history", self.history)):
            if not names:
                raise SchemaMismatchError(f"the schema has no column tagged {role!r}")
        features = [_feature(schema[n]) for n in self.target]
        for role, names in (("history", self.history), ("negative_history", self.negative)):
            got = [_feature(schema[n]) for n in names]
            if names and got != features:
                raise SchemaMismatchError(
                    f"{role} features {got} do not pair with the target item features {features}"
                )
        lengths = {n: _history_length(schema[n]) for n in self.history + self.negative}
        if len(set(lengths.values())) > 1:
            raise SchemaMismatchError(f"history columns have different lengths: {lengths}")
        self.features = features
        self.history_length = next(iter(lengths.values()))
        self.column_domain: dict[str, str] = {}
        self.domain_rows: dict[str, int] = {}
        for names in (self.user, self.target, self.history, self.negative):
            for name in names:
                domain, rows = _domain(schema[name])
                self.column_domain[name] = domain
                self.domain_rows[domain] = max(self.domain_rows.get(domain, 0), rows)
        if search_feature is None:
            search_feature = conventions.CATEGORY_ID if conventions.CATEGORY_ID in features else (
                features[1] if len(features) > 1 else features[0])
        if search_feature not in features:
            raise SchemaMismatchError(
                f"hard-search feature {search_feature!r} is not an item feature ({features})"
            )
        self.search_feature = search_feature



OUTPUTS = ("user", "target", "history", "history_mask", "history_unmasked", "long", "long_mask",
           "long_unmasked", "short", "short_mask", "negative", "short_negative",
           "target_search_key", "long_search_keys")


def _fused_lookups(tables) -> bool:
    """The lookups of ``tables`` (built, one compute dtype of the op's) may be one fused op."""
    dtypes = {t.compute_dtype for t in tables}
    return (all(t.built for t in tables) and len(dtypes) == 1
            and dtypes <= {"float32", "bfloat16"} and model_ops.available())


def _masked(embedded: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Embeddings [B, T, D] with padded steps (mask False) set to zero."""
    return embedded * tf.cast(tf.expand_dims(mask, -1), embedded.dtype)


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class BehaviourEmbeddings(SchemaConfigMixin, mm.Block):
    """Inputs dict -> dict of embedded, split, masked tensors (see the module docstring).

    Output keys: ``user`` [B, F_u*E]; ``target`` [B, F_i*E]; ``long`` [B, L-S, F_i*E] and
    ``long_mask``; ``short`` [B, S, F_i*E] and ``short_mask``; the whole ``history``
    [B, L, F_i*E] and ``history_mask``; ``negative`` [B, L, F_i*E] and ``short_negative``
    [B, S, F_i*E] (when the schema has a negative history); ``target_search_key`` [B] and
    ``long_search_keys`` [B, L-S] (ids of the hard-search feature); ``long_unmasked`` and
    ``history_unmasked``: ``long`` and ``history`` with the padded steps not zeroed, for a
    consumer that gives them zero weight itself (no mask product, nor its gradient).
    ``outputs=`` in the call limits the dict to the keys a model reads (each lookup costs time
    even if unused).
    """

    def __init__(self, schema: Schema, embedding_dim: int = 16, short_length: int = 10,
                 search_feature: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self._schema = schema
        self.layout = SequenceLayout(schema, search_feature)
        self.embedding_dim = int(embedding_dim)
        self.short_length = int(short_length)
        self.search_feature = self.layout.search_feature
        if not 0 < self.short_length < self.layout.history_length:
            raise SchemaMismatchError(
                f"short_length must be in 1 .. {self.layout.history_length - 1} for histories of "
                f"length {self.layout.history_length}, got {short_length}"
            )
        self.tables = {}
        for domain, rows in sorted(self.layout.domain_rows.items()):
            bound = math.sqrt(1.0 / rows)
            # Announced lookups: the trainer's Adam may then defer the untouched rows' steps.
            self.tables[domain] = AnnouncedEmbedding(
                rows, self.embedding_dim, name=f"{domain}_embeddings",
                embeddings_initializer=tf.keras.initializers.RandomUniform(-bound, bound),
            )

    @property
    def long_length(self) -> int:
        return self.layout.history_length - self.short_length

    def _ids(self, inputs, name, sequence=False):
        value = inputs[name]
        if isinstance(value, tf.RaggedTensor):
            value, _ = left_pad(value, self.layout.history_length)
        value = tf.cast(value, tf.int64)
        if not sequence and value.shape.rank == 2:
            value = tf.squeeze(value, axis=1)
        return value

    def _lookup(self, ids: dict, names, mask=None):
        """The rows of the columns ``names`` side by side; zero where ``mask`` (if given) is
        false."""
        tables = [self.tables[self.layout.column_domain[n]] for n in names]
        if _fused_lookups(tables):
            # One op: each row written once, in the compute dtype (the same values), the
            # masked ones as zeros.
            return embedding_rows.embedding_rows([t.embeddings for t in tables],
                                                 [ids[n] for n in names],
                                                 tables[0].compute_dtype, mask=mask)
        parts = [t(ids[n], announced=True) for t, n in zip(tables, names)]
        embedded = tf.concat(parts, axis=-1)
        return embedded if mask is None else _masked(embedded, mask)

    def _lookups(self, lookups: dict) -> dict:
        """``{key: rows}`` for ``lookups`` ``{key: (ids by column, columns, mask or None)}``.
        The lookups of the same tables (a target and its histories) are one op when fused: their
        gradient is then one IndexedSlices per table, where one per lookup would be concatenated
        by the gradient tape (a copy of every gradient row) before the optimizer's update."""
        by_tables = {}
        for key, (_, names, _) in lookups.items():
            domains = tuple(self.layout.column_domain[n] for n in names)
            by_tables.setdefault(domains, []).append(key)
        out = {}
        for domains, keys in by_tables.items():
            tables = [self.tables[d] for d in domains]
            if len(keys) > 1 and _fused_lookups(tables):
                rows = embedding_rows.embedding_row_groups(
                    [t.embeddings for t in tables],
                    [[lookups[k][0][n] for n in lookups[k][1]] for k in keys],
                    tables[0].compute_dtype, [lookups[k][2] for k in keys])
                out.update(zip(keys, rows))
            else:
                out.update((key, self._lookup(*lookups[key])) for key in keys)
        return out

    def call(self, inputs, outputs=None, training=False):
        """The dict of the class docstring; with ``outputs`` (an iterable of its keys) only
        those keys. Lookups a model does not read must not be asked for: a table lookup reads a
        variable, so TensorFlow runs it even when nothing uses its result."""
        layout = self.layout
        wanted = set(OUTPUTS if outputs is None else outputs)
        unknown = wanted - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; known: {list(OUTPUTS)}")
        if not layout.negative:
            wanted -= {"negative", "short_negative"}
        out = {}
        # Each output: (ids by column, columns, mask or None). The long and short parts are
        # looked up on their own, not sliced from the whole history's lookup (the same
        # values): the gradient of a slice is a dense tensor of the whole history
        # (StridedSliceGrad, slow on CPU), that of a lookup stays sparse. Negative-history ids
        # only when asked for: a model that does not read them may be fed without those columns.
        lookups = {}
        for key, names in (("user", layout.user), ("target", layout.target)):
            if key in wanted:
                lookups[key] = ({n: self._ids(inputs, n) for n in names}, names, None)
        negatives = layout.negative if wanted & {"negative", "short_negative"} else []
        ids = {n: self._ids(inputs, n, sequence=True) for n in layout.history + negatives}
        parts = [self.long_length, self.short_length]
        long_ids, short_ids = {}, {}
        for name, value in ids.items():
            long_ids[name], short_ids[name] = tf.split(value, parts, axis=1)
        mask = ids[layout.history[0]] > 0
        long_mask, short_mask = tf.split(mask, parts, axis=1)
        masks = {"history_mask": mask, "long_mask": long_mask, "short_mask": short_mask}
        out.update((key, value) for key, value in masks.items() if key in wanted)
        sequences = {"history": (ids, layout.history, mask),
                     "history_unmasked": (ids, layout.history, None),
                     "long": (long_ids, layout.history, long_mask),
                     "long_unmasked": (long_ids, layout.history, None),
                     "short": (short_ids, layout.history, short_mask),
                     "negative": (ids, layout.negative, mask),
                     "short_negative": (short_ids, layout.negative, short_mask)}
        lookups.update((key, value) for key, value in sequences.items() if key in wanted)
        # Every lookup of a table announced at once (one catch-up per table when an optimizer
        # defers rows: sim_merlin.blocks.table_reads).
        reads = {}
        for source, names, _ in lookups.values():
            for name in names:
                reads.setdefault(layout.column_domain[name], []).append(source[name])
        for domain, read in sorted(reads.items()):
            self.tables[domain].announce(read)
        out.update(self._lookups(lookups))
        index = layout.features.index(self.search_feature)
        if "target_search_key" in wanted:
            out["target_search_key"] = self._ids(inputs, layout.target[index])
        if "long_search_keys" in wanted:
            out["long_search_keys"] = long_ids[layout.history[index]]
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            embedding_dim=self.embedding_dim,
            short_length=self.short_length,
            search_feature=self.search_feature,
        )
        return self._config_with_schema(config)
