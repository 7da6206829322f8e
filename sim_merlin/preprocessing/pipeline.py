"""Raw Amazon-layout logs -> SIM training data (parquet + Merlin schema), with NVTabular.

Stages (each shows progress; all intermediate files live in a temporary directory next to the
output, which is renamed into place only when everything succeeded):

1. **read**: reviews and meta files -> parquet parts (:mod:`sim_merlin.preprocessing.raw`);
2. **filter users**: count behaviours per user (Dask) and keep users with at least
   ``min_user_interactions`` (NVTabular ``Filter``), duplicates counted as the reference counts
   them;
3. **encode** (NVTabular workflow, fitted on the kept behaviours): join each review with its
   item's category and item features (``JoinExternal``), then ``Categorify`` users, items,
   categories and extra features (0 = padding, 1 = null, 2 = out-of-vocabulary; real values
   from 3);
4. **group** (NVTabular workflow): hash-partition by user (``shuffle_by_keys``, so no user is
   split) and ``Groupby`` user, sorting each user's behaviours by (time, item string) as the
   reference does;
5. **samples** (NVTabular workflows, one per split): :class:`BuildSamples` emits the train and test
   samples with negatives, written with ``to_parquet`` together with their ``schema.pbtxt``,
   then rewritten with every column declared non-nullable
   (:mod:`sim_merlin.preprocessing.required_columns`), which is faster to read.

The fitted encode workflow is saved under ``OUTPUT/workflow`` so new logs can be encoded the same
way later (``nvtabular.Workflow.load``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sim_merlin.environment import announce_backend, compute_backend
from sim_merlin.files import process_alive, replace_directory
from sim_merlin.preprocessing import raw
from sim_merlin.preprocessing.required_columns import require_values
from sim_merlin.schema import CATEGORY_ID, ITEM_ID, USER_ID


_ROWS_PER_ENCODE_PARTITION = 2_000_000


class PreprocessingError(RuntimeError):
    """The data cannot be turned into samples (the message says why and what to change)."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    reviews: Path
    meta: Path
    output: Path
    min_user_interactions: int = 20
    max_sequence_length: int = 100
    min_history: int = 1
    seed: int = 12345
    item_features: tuple[str, ...] = ()
    user_features: tuple[str, ...] = ()
    exclude_positive_negatives: bool = False
    keep_duplicates: bool = False
    skip_bad_lines: bool = False
    overwrite: bool = False
    workers: int = 0
    users_per_partition: int = 2000
    device: str = "auto"

    def __post_init__(self):
        if self.min_user_interactions < 3:
            raise ValueError(
                "min_user_interactions must be >= 3 (a user needs a test sample and at least one "
                f"training sample), got {self.min_user_interactions}"
            )
        if self.min_history < 1:
            raise ValueError(f"shortest_sequence_for_training must be >= 1, got {self.min_history}")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")
        reserved = {"user", "item", "time", "category", "asin", "reviewerID", "unixReviewTime"}
        for name in (*self.item_features, *self.user_features):
            if name in reserved or not name.isidentifier():
                raise ValueError(f"feature name {name!r} is reserved or not an identifier")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {self.device!r}")


class _Stages:
    """Prints one line per stage with its wall time (and keeps them for the summary)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.times: dict[str, float] = {}

    def run(self, name: str, function, *args, **kwargs):
        from dask.diagnostics import ProgressBar

        print(f"[preprocess] {name} ...", file=self.stream, flush=True)
        started = time.perf_counter()
        # Dask's bar appears only for computations that last long enough to need it.
        with ProgressBar(minimum=10.0, dt=0.1, out=self.stream):
            result = function(*args, **kwargs)
        self.times[name] = time.perf_counter() - started
        print(f"[preprocess] {name}: {self.times[name]:.1f} s", file=self.stream, flush=True)
        return result


def _line_progress(description: str):
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=" lines", unit_scale=True, mininterval=2.0, file=sys.stderr,
               disable=None)
    return bar


def _read_raw(config: PreprocessConfig, work: Path, workers: int) -> tuple[raw.ReadResult, raw.ReadResult]:
    bar = _line_progress("read reviews")
    reviews = raw.read_reviews(
        config.reviews, work / "reviews", user_features=config.user_features,
        skip_bad_lines=config.skip_bad_lines, workers=workers, progress=bar.update,
    )
    bar.close()
    bar = _line_progress("read meta")
    meta = raw.read_meta(
        config.meta, work / "meta", item_features=config.item_features,
        skip_bad_lines=config.skip_bad_lines, workers=workers, progress=bar.update,
    )
    bar.close()
    if reviews.rows == 0:
        raise PreprocessingError(f"{config.reviews}: no reviews were read ({reviews.lines} lines)")
    return reviews, meta


def _items_table(meta: raw.ReadResult, config: PreprocessConfig) -> pd.DataFrame:
    """One row per item (asin, category, item features); duplicate asins are an error."""
    frames = [pd.read_parquet(p) for p in meta.parts]
    items = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {"item": [], "category": [], "line": []}
    )
    repeated = items[items.duplicated("item", keep=False)]
    if len(repeated):
        asin = repeated["item"].iloc[0]
        lines = repeated.loc[repeated["item"] == asin, "line"].tolist()
        if not config.skip_bad_lines:
            raise PreprocessingError(
                f"{config.meta}: item {asin!r} appears more than once (lines "
                f"{', '.join(map(str, lines[:5]))}); each item needs exactly one meta line "
                "(--skip_bad_lines keeps the first)"
            )
        items = items.drop_duplicates("item", keep="first")
    return items.drop(columns=["line"]).rename(columns={"item": ITEM_ID, "category": CATEGORY_ID})


def _filter_users(config: PreprocessConfig, work: Path, reviews_dir: Path) -> tuple[Path, int]:
    """Keep users with at least ``min_user_interactions`` reviews (duplicates counted, as the
    reference counts them): Dask counts reviews per user, NVTabular's ``Filter`` applies it.

    (NVTabular's ``JoinGroupby`` count was tried first: at the full Amazon Books size, 8M users,
    its transform met users missing from its own fitted statistics.)"""
    import dask.dataframe as dd
    import nvtabular as nvt
    from merlin.io import Dataset

    counts = dd.read_parquet(str(reviews_dir), columns=[USER_ID])[USER_ID].value_counts(
        split_every=8
    ).compute()
    keep = counts.to_numpy() >= config.min_user_interactions
    kept = frozenset(counts.index[keep])
    columns = [USER_ID, ITEM_ID, "time", *config.user_features]
    selected = columns >> nvt.ops.Filter(f=lambda df, users=kept: df[USER_ID].isin(users))
    reviews = Dataset(str(reviews_dir), engine="parquet")
    workflow = nvt.Workflow(selected)
    workflow.fit_schema(reviews.schema)
    out = work / "filtered"
    # Few large partitions: the encode stage joins every partition with the whole item table.
    files = max(1, -(-int(counts.to_numpy()[keep].sum()) // _ROWS_PER_ENCODE_PARTITION))
    workflow.transform(reviews).to_parquet(str(out), output_files=files)
    return out, len(kept)


def _reviewed_items(filtered_dir: Path) -> set[str]:
    import dask.dataframe as dd

    return set(dd.read_parquet(str(filtered_dir), columns=[ITEM_ID])[ITEM_ID].unique().compute())


def _encode(config: PreprocessConfig, work: Path, items: pd.DataFrame, filtered_dir: Path):
    """NVTabular workflow (saved with the output): join item category and features
    (``JoinExternal``), fill missing categories, ``Categorify`` users, items and features."""
    import nvtabular as nvt
    from merlin.io import Dataset

    item_extra = list(config.item_features)
    user_extra = list(config.user_features)
    reviews = Dataset(str(filtered_dir), engine="parquet", part_size="2GB")
    joined = [USER_ID, ITEM_ID, "time", *user_extra] >> nvt.ops.JoinExternal(
        items, on=ITEM_ID, how="left", columns_ext=[ITEM_ID, CATEGORY_ID, *item_extra]
    )
    category = joined[CATEGORY_ID] >> nvt.ops.FillMissing(fill_val=raw.NO_CATEGORY)
    asin = joined[ITEM_ID] >> nvt.ops.Rename(f=lambda name: "item_asin")
    encoded = (
        joined[[USER_ID, ITEM_ID, *user_extra, *item_extra]] + category
    ) >> nvt.ops.Categorify(out_path=str(work / "categories"))  # not ./categories in the cwd
    workflow = nvt.Workflow(encoded + asin + joined["time"])
    workflow.fit(reviews)
    out = work / "encoded"
    workflow.transform(reviews).to_parquet(str(out))
    return workflow, out


@contextlib.contextmanager
def _dask_cluster(backend):
    """On the GPU path, one dask-cuda worker per GPU; on CPU, Dask's local scheduler (no
    cluster: NVTabular's CPU operators run in the calling process and its threads)."""
    if not backend.is_gpu:
        yield None
        return
    from dask.distributed import Client
    from dask_cuda import LocalCUDACluster

    with LocalCUDACluster(rmm_pool_size=None) as cluster, Client(cluster) as client:
        yield client


def preprocess(config: PreprocessConfig) -> dict:
    """Run the whole pipeline; return a summary (counts, cardinalities, stage times). The
    summary is also written to ``OUTPUT/preprocess.json``, without the stage times."""
    backend = compute_backend(prefer_gpu=config.device != "cpu")
    if config.device == "gpu" and not backend.is_gpu:
        raise PreprocessingError(f"--device gpu was requested but {backend.reason}")
    announce_backend("preprocess", backend)
    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise PreprocessingError(
            f"output directory {output} already exists; choose another or pass --overwrite"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    # Work happens in .OUTPUT.partial next to OUTPUT (one name, no process id: paths inside the
    # saved workflow then repeat exactly run after run); its owner file names the process.
    work = output.parent / f".{output.name}.partial"
    old = output.parent / f".{output.name}.replaced"
    _claim(work, old)
    stages = _Stages()
    workers = config.workers or raw.default_workers()
    try:
        with _dask_cluster(backend):
            summary = _run(config, work, stages, workers)
        final = work / "final"
        # The stage times are printed and returned, not written: the output holds only what
        # the inputs and options determine, so that a rerun repeats it byte for byte.
        recorded = {k: v for k, v in summary.items() if k != "stage_seconds"}
        (final / "preprocess.json").write_text(json.dumps(recorded, indent=2, default=str) + "\n")
        replace_directory(final, output, old)  # --overwrite: the old output stays whole
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _sort_json_keys(path: Path) -> None:
    """Rewrite a JSON file with its object keys sorted. Merlin writes ``.merlin/schema.json``
    from protobuf maps, whose key order changes from process to process; sorted, the file
    repeats byte for byte (readers do not depend on the order)."""
    if path.exists():
        path.write_text(json.dumps(json.loads(path.read_text()), sort_keys=True))


def _drop_clock(path: Path) -> None:
    """Remove NVTabular's ``generated_timestamp`` (the save time) from a saved workflow's
    ``metadata.json``; ``Workflow.load`` reads only the versions beside it."""
    metadata = json.loads(path.read_text())
    metadata.pop("generated_timestamp", None)
    path.write_text(json.dumps(metadata, sort_keys=True))


_OWNER = "owner.pid"


def _claim(work: Path, old: Path) -> None:
    """Make ``work`` this run's (empty, with an owner file). Work left by a killed run is
    removed, with a note; a live run writing the same output is an error."""
    owner = work / _OWNER
    if work.exists():
        pid = owner.read_text().strip() if owner.exists() else ""
        if pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid)):
            raise PreprocessingError(f"{work} belongs to a preprocessing run that is still "
                                     f"going (process {pid}) and writes the same output")
        print(f"[preprocess] removing {work} (left by an interrupted run"
              + (f", process {pid})" if pid else ")"), file=sys.stderr, flush=True)
        shutil.rmtree(work)
    if old.exists():  # killed between moving the old output aside and deleting it
        shutil.rmtree(old)
    work.mkdir()
    owner.write_text(f"{os.getpid()}\n")


def _run(config: PreprocessConfig, work: Path, stages: _Stages, workers: int) -> dict:
    import nvtabular as nvt
    from merlin.io import Dataset

    from sim_merlin.preprocessing.operators import BuildSamples
    from sim_merlin.preprocessing.samples import NegativeSampler

    reviews, meta = stages.run("read", _read_raw, config, work, workers)
    items = _items_table(meta, config)
    filtered_dir, kept_users = stages.run(
        "filter users", _filter_users, config, work, work / "reviews"
    )
    if kept_users == 0:
        raise PreprocessingError(
            f"no user has at least {config.min_user_interactions} behaviours in {config.reviews} "
            f"({reviews.rows} reviews read); lower --min_user_interactions"
        )
    reviewed = _reviewed_items(filtered_dir)
    missing_meta = sorted(reviewed - set(items[ITEM_ID]))
    items = items[items[ITEM_ID].isin(reviewed)]
    if missing_meta:
        print(
            f"[preprocess] warning: {len(missing_meta):,} reviewed items have no line in "
            f"{config.meta} (e.g. {', '.join(map(repr, missing_meta[:3]))}); they get the "
            f"'{raw.NO_CATEGORY}' category",
            file=sys.stderr, flush=True,
        )
    workflow, encoded_dir = stages.run("encode", _encode, config, work, items, filtered_dir)
    encoded = Dataset(str(encoded_dir), engine="parquet")
    frame = encoded.to_ddf()[[ITEM_ID, CATEGORY_ID, *config.item_features]].compute()
    item_names = [ITEM_ID, CATEGORY_ID, *config.item_features]
    user_names = [USER_ID, *config.user_features]
    cardinalities = {
        name: int(workflow.output_schema[name].int_domain.max) + 1
        for name in item_names + user_names
    }
    # Item id -> each item feature (every item has one value; pad/null/OOV rows stay 0).
    item_table = {}
    for name in item_names[1:]:
        table = np.zeros(cardinalities[ITEM_ID], dtype=np.int32)
        table[frame[ITEM_ID].to_numpy()] = frame[name].to_numpy()
        item_table[name] = table
    sampler = NegativeSampler(frame[ITEM_ID].to_numpy(), item_table)
    n_users = kept_users

    def group():
        aggs = {name: ["list"] for name in item_names + ["time"]}
        aggs.update({name: ["last"] for name in config.user_features})
        columns = [USER_ID, "time", "item_asin", *item_names, *config.user_features]
        grouped = columns >> nvt.ops.Groupby(
            groupby_cols=[USER_ID], sort_cols=["time", "item_asin"], aggs=aggs, name_sep="_"
        )
        partitions = max(1, -(-n_users // config.users_per_partition))
        dataset = Dataset(str(encoded_dir), engine="parquet").shuffle_by_keys(
            [USER_ID], npartitions=partitions
        )
        grouped_workflow = nvt.Workflow(grouped)
        grouped_workflow.fit_schema(dataset.schema)
        out = work / "grouped"
        grouped_workflow.transform(dataset).to_parquet(str(out), output_files=partitions)
        return out

    grouped_dir = stages.run("group", group)

    def samples(split: str):
        op = BuildSamples(
            split, config.max_sequence_length, config.seed, sampler,
            item_cardinalities={n: cardinalities[n] for n in item_names},
            user_cardinalities={n: cardinalities[n] for n in user_names},
            keep_duplicates=config.keep_duplicates,
            exclude_positive_negatives=config.exclude_positive_negatives,
            min_history=config.min_history,
        )
        dataset = Dataset(str(grouped_dir), engine="parquet", part_size="1GB")
        sample_workflow = nvt.Workflow(op.input_columns() >> op)
        sample_workflow.fit_schema(dataset.schema)
        sample_workflow.transform(dataset).to_parquet(
            str(work / "final" / split), output_files=dataset.npartitions
        )
        # Columns declared non-nullable: the data loader decodes them about 1.5x faster.
        require_values(work / "final" / split)

    stages.run("train samples", samples, "train")
    stages.run("test samples", samples, "test")
    for split in ("train", "test"):
        _sort_json_keys(work / "final" / split / ".merlin" / "schema.json")
    workflow.save(str(work / "final" / "workflow"))
    _drop_clock(work / "final" / "workflow" / "metadata.json")
    counts = {
        split: int(Dataset(str(work / "final" / split), engine="parquet").num_rows)
        for split in ("train", "test")
    }
    return {
        "reviews": str(config.reviews),
        "meta": str(config.meta),
        "review_lines": reviews.lines,
        "reviews_read": reviews.rows,
        "bad_review_lines_skipped": reviews.skipped,
        "meta_items": meta.rows,
        "reviewed_items_without_meta": len(missing_meta),
        "bad_meta_lines_skipped": meta.skipped,
        "skipped_line_examples": reviews.examples + meta.examples,
        "users": n_users,
        "interactions_kept": int(len(frame)),
        "cardinalities": cardinalities,
        "train_rows": counts["train"],
        "test_rows": counts["test"],
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in dataclasses.asdict(config).items()},
        "stage_seconds": stages.times,
        "backend": compute_backend(prefer_gpu=config.device != "cpu").name,
    }
