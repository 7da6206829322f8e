"""Keras config support for blocks built from a Merlin schema (stored as metadata JSON)."""
from __future__ import annotations

from merlin.models.utils.schema_utils import (
    schema_to_tensorflow_metadata_json,
    tensorflow_metadata_json_to_schema,
)


class SchemaConfigMixin:
    """``get_config`` stores ``self._schema``; ``from_config`` rebuilds it. Mix in before the
    Keras base class and call ``self._config_with_schema(config)`` in ``get_config``."""

    def _config_with_schema(self, config: dict) -> dict:
        config["schema"] = schema_to_tensorflow_metadata_json(self._schema)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schema"] = tensorflow_metadata_json_to_schema(config["schema"])
        return cls(**config)
