"""Preprocessing: raw Amazon-layout logs -> parquet + Merlin schema, with NVTabular workflows."""
