"""Read Amazon Reviews 2014 layout files (plain or gzipped) into parquet, with exact error lines.

Reviews are strict JSON lines; meta lines are Python literals (as in the real ``meta_*.json``) or
JSON. Both are read in chunks of whole lines, parsed in worker processes and written as parquet
parts, so memory stays bounded by the chunk size whatever the file size. Every error names the
file, the line number and what was expected; with ``skip_bad_lines`` the bad lines are counted and
skipped instead.

Example::

    >>> import json, pathlib, tempfile
    >>> from sim_merlin.preprocessing.raw import read_reviews
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "r.json").write_text(json.dumps(
    ...     {"reviewerID": "A1", "asin": "B1", "unixReviewTime": 86400}) + "\\n")
    >>> read_reviews(d / "r.json", d / "out").rows
    1
"""
from __future__ import annotations

import ast
import concurrent.futures as futures
import dataclasses
import gzip
import io
import json
import os
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.json as pa_json
import pyarrow.parquet as pq

CHUNK_BYTES = 32 * 2**20
NO_CATEGORY = "<no category>"


class RawInputError(ValueError):
    """A raw input file does not have the expected layout; the message names file and line."""


@dataclasses.dataclass
class ReadResult:
    """What a read produced: parquet parts, row count, skipped bad lines and their first errors."""

    parts: list[Path]
    rows: int
    lines: int
    skipped: int
    examples: list[str]


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _open_binary(path: Path):
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise RawInputError(f"{what} file not found: {path}")
    if not path.is_file():
        raise RawInputError(f"{what} path is not a file: {path}")
    if path.stat().st_size == 0:
        raise RawInputError(f"{what} file is empty: {path}")
    return path


def line_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(number of the chunk's first line, bytes of whole lines), reading gzip transparently."""
    line = 1
    carry = b""
    try:
        with _open_binary(path) as handle:
            while True:
                block = handle.read(chunk_bytes)
                if not block:
                    break
                block = carry + block
                cut = block.rfind(b"\n")
                if cut < 0:
                    carry = block
                    continue
                chunk, carry = block[: cut + 1], block[cut + 1 :]
                yield line, chunk
                line += chunk.count(b"\n")
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise RawInputError(f"{path}: cannot read the file after line {line}: {err}") from None
    if carry.strip():
        yield line, carry + b"\n"


def _decode(raw: bytes, path: str, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RawInputError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})")


# --------------------------------------------------------------------------------------------
# Reviews
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReviewFields:
    """Which review fields to keep: the three the model needs plus optional per-user features."""

    user_features: tuple[str, ...] = ()

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [("reviewerID", pa.string()), ("asin", pa.string()), ("unixReviewTime", pa.int64())]
            + [(name, pa.string()) for name in self.user_features]
        )


def _check_review(record, fields: ReviewFields) -> str | None:
    """None when ``record`` is a usable review, else what is wrong with it."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in ("reviewerID", "asin"):
        value = record.get(key)
        if value is None:
            return f"missing field {key!r}"
        if not isinstance(value, str) or not value:
            return f"field {key!r} must be a non-empty string, got {value!r}"
    stamp = record.get("unixReviewTime")
    if stamp is None:
        return "missing field 'unixReviewTime'"
    if isinstance(stamp, bool) or not isinstance(stamp, int):
        return f"field 'unixReviewTime' must be an integer (unix seconds), got {stamp!r}"
    if stamp < 0:
        return f"field 'unixReviewTime' must be >= 0, got {stamp}"
    for key in fields.user_features:
        value = record.get(key)
        if value is not None and not isinstance(value, (str, int, float)):
            return f"user feature {key!r} must be a string or number, got {type(value).__name__}"
    return None


def _reviews_slow(data: bytes, first_line: int, path: str, fields: ReviewFields, skip: bool):
    """Line by line, to find (or skip) exactly the bad lines."""
    rows: dict[str, list] = {name: [] for name in fields.arrow_schema.names}
    skipped, examples = 0, []
    for offset, raw in enumerate(data.split(b"\n")[:-1]):
        number = first_line + offset
        if not raw.strip():
            continue
        text = _decode(raw, path, number)
        try:
            record = json.loads(text)
            problem = _check_review(record, fields)
        except json.JSONDecodeError as err:
            problem = f"not a JSON object ({err.msg} at column {err.colno})"
        if problem is not None:
            message = f"{path}:{number}: {problem}"
            if not skip:
                raise RawInputError(message)
            skipped += 1
            if len(examples) < 5:
                examples.append(message)
            continue
        for name in fields.arrow_schema.names:
            value = record.get(name)
            rows[name].append(value if name == "unixReviewTime" or value is None else str(value))
    table = pa.table(
        {name: pa.array(values, type=fields.arrow_schema.field(name).type)
         for name, values in rows.items()}
    )
    return table, skipped, examples


def _fast_table_is_valid(table: pa.Table) -> bool:
    """The checks of ``_check_review`` on a whole parsed chunk at once."""
    if len(table) == 0:
        return True
    if any(table.column(k).null_count for k in ("reviewerID", "asin", "unixReviewTime")):
        return False
    if pa.compute.min(table.column("unixReviewTime")).as_py() < 0:
        return False
    return all(
        pa.compute.min(pa.compute.utf8_length(table.column(k))).as_py() > 0
        for k in ("reviewerID", "asin")
    )


def _parse_reviews(data: bytes, first_line: int, path: str, fields: ReviewFields, skip: bool):
    """Fast path: Arrow's JSON reader; any doubt sends the chunk through the line-by-line path."""
    options = pa_json.ParseOptions(
        explicit_schema=fields.arrow_schema, unexpected_field_behavior="ignore"
    )
    try:
        table = pa_json.read_json(io.BytesIO(data), parse_options=options)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return _reviews_slow(data, first_line, path, fields, skip)
    table = table.select(fields.arrow_schema.names)
    if not _fast_table_is_valid(table):
        return _reviews_slow(data, first_line, path, fields, skip)
    return table, 0, []


def _write_reviews_chunk(job) -> tuple[int, int, int, list[str]]:
    index, first_line, data, path, fields, skip, out_dir = job
    table, skipped, examples = _parse_reviews(data, first_line, path, fields, skip)
    table = table.rename_columns(["user_id", "item_id", "time", *fields.user_features])
    pq.write_table(table, Path(out_dir) / f"part-{index:05d}.parquet")
    return len(table), data.count(b"\n"), skipped, examples


# --------------------------------------------------------------------------------------------
# Meta
# --------------------------------------------------------------------------------------------


def _parse_meta_line(text: str) -> dict:
    stripped = text.strip()
    try:
        record = json.loads(stripped)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(stripped)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            detail = getattr(err, "msg", None) or str(err).split("\n")[0]
            raise ValueError(
                f"neither JSON nor a Python literal dict ({detail})"
            ) from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a dict (one item per line), got {type(record).__name__}")
    return record


def item_category(record: dict) -> str:
    """The reference's rule: last element of the first category path, or NO_CATEGORY."""
    paths = record.get("categories")
    if paths is None:
        return NO_CATEGORY
    if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
        raise ValueError(f"'categories' must be a list of category paths, got {paths!r:.80}")
    if not paths or not paths[0]:
        return NO_CATEGORY
    leaf = paths[0][-1]
    if not isinstance(leaf, str):
        raise ValueError(f"category names must be strings, got {leaf!r}")
    return leaf


def _write_meta_chunk(job) -> tuple[int, int, int, list[str]]:
    index, first_line, data, path, item_features, skip, out_dir = job
    columns: dict[str, list] = {"item": [], "category": [], "line": []}
    columns.update({name: [] for name in item_features})
    skipped, examples = 0, []
    for offset, raw in enumerate(data.split(b"\n")[:-1]):
        number = first_line + offset
        if not raw.strip():
            continue
        try:
            record = _parse_meta_line(_decode(raw, path, number))
            asin = record.get("asin")
            if not isinstance(asin, str) or not asin:
                raise ValueError(f"field 'asin' must be a non-empty string, got {asin!r}")
            category = item_category(record)
            extras = {}
            for name in item_features:
                value = record.get(name)
                if value is not None and not isinstance(value, (str, int, float)):
                    raise ValueError(
                        f"item feature {name!r} must be a string or number, got "
                        f"{type(value).__name__}"
                    )
                extras[name] = None if value is None else str(value)
        except (ValueError, RawInputError) as err:
            message = str(err) if isinstance(err, RawInputError) else f"{path}:{number}: {err}"
            if not skip:
                raise RawInputError(message) from None
            skipped += 1
            if len(examples) < 5:
                examples.append(message)
            continue
        columns["item"].append(asin)
        columns["category"].append(category)
        columns["line"].append(number)
        for name, value in extras.items():
            columns[name].append(value)
    table = pa.table(
        {
            "item": pa.array(columns["item"], pa.string()),
            "category": pa.array(columns["category"], pa.string()),
            "line": pa.array(columns["line"], pa.int64()),
            **{name: pa.array(columns[name], pa.string()) for name in item_features},
        }
    )
    pq.write_table(table, Path(out_dir) / f"part-{index:05d}.parquet")
    return len(table), data.count(b"\n"), skipped, examples


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _bounded_map(function: Callable, jobs: Iterator, workers: int) -> Iterator:
    """``map`` over a process pool with at most ``2 * workers`` chunks in memory, in order."""
    if workers <= 1:
        yield from map(function, jobs)
        return
    with futures.ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(function, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _read(path: Path, out_dir: Path, worker: Callable, extra, skip: bool, workers: int,
          progress: Callable[[int], None] | None, chunk_bytes: int) -> ReadResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = (
        (index, first, data, str(path), extra, skip, str(out_dir))
        for index, (first, data) in enumerate(line_chunks(path, chunk_bytes))
    )
    rows = lines = skipped = 0
    examples: list[str] = []
    parts = []
    for index, (n_rows, n_lines, n_skipped, chunk_examples) in enumerate(
        _bounded_map(worker, jobs, workers)
    ):
        parts.append(out_dir / f"part-{index:05d}.parquet")
        rows += n_rows
        lines += n_lines
        skipped += n_skipped
        examples.extend(chunk_examples[: max(0, 5 - len(examples))])
        if progress is not None:
            progress(n_lines)
    return ReadResult(parts=parts, rows=rows, lines=lines, skipped=skipped, examples=examples)


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1, 8))


def read_reviews(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    user_features: Sequence[str] = (),
    skip_bad_lines: bool = False,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> ReadResult:
    """Reviews -> parquet parts with columns user_id, item_id (raw strings), time (+ user
    features), in file order."""
    path = check_input_file(path, "reviews")
    fields = ReviewFields(tuple(user_features))
    return _read(path, Path(out_dir), _write_reviews_chunk, fields, skip_bad_lines, workers,
                 progress, chunk_bytes)


def read_meta(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    item_features: Sequence[str] = (),
    skip_bad_lines: bool = False,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> ReadResult:
    """Meta -> parquet parts with columns item, category, line (+ item features)."""
    path = check_input_file(path, "meta")
    return _read(path, Path(out_dir), _write_meta_chunk, tuple(item_features), skip_bad_lines,
                 workers, progress, chunk_bytes)


__all__ = [
    "NO_CATEGORY",
    "RawInputError",
    "ReadResult",
    "item_category",
    "line_chunks",
    "read_meta",
    "read_reviews",
]
