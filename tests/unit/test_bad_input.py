"""Bad input to the two commands a user runs, ``workflows/preprocess.py`` and
``python -m sim_merlin.fit``: every case must end with exit status 2 and one clear message that
names the file (and line) or column and what was expected; no traceback, no output written, no
work files left behind, and an existing output untouched.

Each case builds a small valid input, breaks one thing, and runs the command's ``main`` (the same
code the command line runs)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import sim_merlin  # noqa: F401  (before tensorflow)

ROOT = Path(__file__).resolve().parents[2]


def _preprocess_main():
    spec = importlib.util.spec_from_file_location("preprocess_cli",
                                                  ROOT / "workflows" / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ------------------------------------------------------------------------ preprocessing

USERS, PER_USER = 4, 6  # 24 review lines; with --min_user_interactions 5 every user is kept


def _review(user="U1", item="I1", stamp=86400):
    return json.dumps({"reviewerID": user, "asin": item, "unixReviewTime": stamp})


def _reviews():
    return [_review(f"U{u}", f"I{(u + k) % 9}", 86400 * k)
            for u in range(USERS) for k in range(PER_USER)]


def _meta():
    return [repr({"asin": f"I{i}", "categories": [["Books", f"C{i % 3}"]]}) for i in range(9)]


def _write(path: Path, lines) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _append_review(line):
    def damage(reviews, meta):
        _write(reviews, _reviews() + [line])
    return damage


def _append_meta(line):
    def damage(reviews, meta):
        _write(meta, _meta() + [line])
    return damage


def _empty(which):
    def damage(reviews, meta):
        {"reviews": reviews, "meta": meta}[which].write_text("")
    return damage


def _missing_reviews(reviews, meta):
    reviews.unlink()


def _truncated_gzip(reviews, meta):
    data = gzip.compress("".join(_review(f"U{i}") + "\n" for i in range(3000)).encode())
    reviews.unlink()
    reviews.with_suffix(".json.gz").write_bytes(data[: len(data) // 2])


def _not_utf8(reviews, meta):
    reviews.write_bytes(("\n".join(_reviews()) + "\n").encode() + b'{"reviewerID": "\xff"}\n')


def _duplicate_meta(reviews, meta):
    _write(meta, _meta() + [repr({"asin": "I1", "categories": [["Books", "Other"]]})])


def _short_users(reviews, meta):
    _write(reviews, _reviews()[:3] + _reviews()[6:9])  # 3 behaviours per user, 5 needed


def _output_exists(reviews, meta):
    pass  # the output directory is made by the test (case id "output exists")


TRUNCATED = _review("U1", "I1", 5)[:30]
PREPROCESS_CASES = {
    # case: (damage, regex the message must match)
    "truncated review line": (_append_review(TRUNCATED), r"reviews\.json:25: not a JSON object"),
    "non-JSON review line": (_append_review("hello"), r"reviews\.json:25: not a JSON object"),
    "review line not an object": (_append_review('["U1", "I1", 5]'),
                                  r"reviews\.json:25: expected a JSON object"),
    "review without asin": (_append_review('{"reviewerID": "U1", "unixReviewTime": 5}'),
                            r"reviews\.json:25: missing field 'asin'"),
    "review without reviewerID": (_append_review('{"asin": "I1", "unixReviewTime": 5}'),
                                  r"reviews\.json:25: missing field 'reviewerID'"),
    "review without unixReviewTime": (_append_review('{"reviewerID": "U1", "asin": "I1"}'),
                                      r"reviews\.json:25: missing field 'unixReviewTime'"),
    "timestamp is a string": (_append_review(_review(stamp="12")),
                              r"reviews\.json:25: .*unixReviewTime.* must be an integer"),
    "timestamp is fractional": (_append_review(_review(stamp=5.5)),
                                r"reviews\.json:25: .*must be an integer"),
    "negative timestamp": (_append_review(_review(stamp=-86400)),
                           r"reviews\.json:25: .*must be >= 0"),
    "review line not UTF-8": (_not_utf8, r"reviews\.json:25: not UTF-8 text"),
    "meta line neither JSON nor Python": (_append_meta("{'asin': 'I9', 'categories': [["),
                                          r"meta\.json:10: .*neither JSON nor a Python literal"),
    "meta line without asin": (_append_meta("{'title': 'x'}"),
                               r"meta\.json:10: .*field 'asin' must be a non-empty string"),
    "meta categories not a list": (_append_meta("{'asin': 'I9', 'categories': 'Books'}"),
                                   r"meta\.json:10: .*must be a list of category paths"),
    "duplicate meta item": (_duplicate_meta,
                            r"meta\.json: item 'I1' appears more than once \(lines 2, 10\)"),
    "empty reviews file": (_empty("reviews"), r"reviews file is empty: .*reviews\.json"),
    "empty meta file": (_empty("meta"), r"meta file is empty: .*meta\.json"),
    "reviews file missing": (_missing_reviews, r"reviews file not found: .*reviews\.json"),
    "truncated gzip file": (_truncated_gzip, r"reviews\.json\.gz: cannot read the file after line"),
    "no user passes the length filter": (_short_users,
                                         r"no user has at least 5 behaviours in .*reviews\.json"),
    "output exists": (_output_exists, r"output directory .*out already exists.*--overwrite"),
}


@pytest.fixture(scope="module")
def preprocess_main():
    return _preprocess_main()


@pytest.mark.parametrize("case", sorted(PREPROCESS_CASES))
def test_bad_raw_input_is_named_and_writes_nothing(case, tmp_path, capsys, preprocess_main):
    damage, message = PREPROCESS_CASES[case]
    reviews, meta, out = tmp_path / "reviews.json", tmp_path / "meta.json", tmp_path / "out"
    _write(reviews, _reviews())
    _write(meta, _meta())
    damage(reviews, meta)
    if case == "output exists":
        out.mkdir()
        (out / "earlier.txt").write_text("an earlier result")
    if not reviews.exists() and reviews.with_suffix(".json.gz").exists():
        reviews = reviews.with_suffix(".json.gz")
    before = sorted(p.name for p in tmp_path.iterdir())
    status = preprocess_main(["--reviews", str(reviews), "--meta", str(meta), "--output",
                              str(out), "--min_user_interactions", "5",
                              "--max_sequence_length", "4", "--workers", "1"])
    error = capsys.readouterr().err
    assert status == 2
    assert re.search(message, error), error
    assert "Traceback" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no work files
    if case == "output exists":
        assert [p.name for p in out.iterdir()] == ["earlier.txt"]


# ------------------------------------------------------------------------ training


def _edit_schema(edit):
    """A damage that rewrites both splits' schema.pbtxt text with ``edit(text)``."""
    def damage(data: Path):
        for split in ("train", "test"):
            path = data / split / "schema.pbtxt"
            path.write_text(edit(path.read_text()))
    return damage


def _column_block(text: str, name: str) -> tuple[int, int]:
    """Start and end of the ``feature { ... }`` block of column ``name`` in schema.pbtxt."""
    start = text.index(f'feature {{\n  name: "{name}"')
    end = text.find("\nfeature {", start + 1)
    return start, (len(text) if end < 0 else end + 1)


def _drop_tag(name: str, tag: str):
    return _edit_column(name, (f'\n    tag: "{tag}"', ""))


def _both(first, second):
    def damage(data: Path):
        first(data)
        second(data)
    return damage


def _edit_column(name: str, *replacements):
    """A schema damage: in column ``name``'s block, replace each (regex, replacement) once."""
    def edit(text):
        start, end = _column_block(text, name)
        block = text[start:end]
        for pattern, replacement in replacements:
            block, found = re.subn(pattern, replacement, block, count=1)
            assert found, (pattern, block)
        return text[:start] + block + text[end:]
    return _edit_schema(edit)


def _rewrite_parquet(change):
    """A damage that rewrites the train split's (single) parquet file with ``change(frame)``."""
    def damage(data: Path):
        (path,) = sorted((data / "train").glob("*.parquet"))
        frame = pd.read_parquet(path)
        change(frame)
        frame.to_parquet(path, index=False)
    return damage


def _nan_label(frame):
    frame["label"] = frame["label"].astype("float64")
    frame.loc[3, "label"] = float("nan")


def _label_two(frame):
    frame.loc[7, "label"] = 2


def _short_history_row(frame):
    frame.at[5, "item_id_history"] = frame.at[5, "item_id_history"][1:]


def _remove(name):
    def damage(data: Path):
        for path in (data / "train").glob(name):
            path.unlink()
    return damage


def _drop_column(frame):
    del frame["category_id_neg_history"]


def _garbage_schema(data: Path):
    (data / "train" / "schema.pbtxt").write_text("feature { name: \n")


SMALL = ["--embedding_dim", "4", "--long_seq_length", "15", "--top_k", "6", "--esu_heads", "2",
         "--stage_one_mlp_dims", "8", "--stage_two_mlp_dims", "8", "--aux_mlp_dims", "4",
         "--print_every", "0", "--progress", "off", "--global_batch_size", "64",
         "--no_train_eval", "--seed", "3"]

FIT_CASES = {
    # case: (damage of the data set copy, extra options, regex the message must match)
    "split without schema.pbtxt": (_remove("schema.pbtxt"), [],
                                   r"train/schema\.pbtxt: missing"),
    "unreadable schema.pbtxt": (_garbage_schema, [],
                                r"train/schema\.pbtxt: not a readable Merlin schema"),
    "split without parquet files": (_remove("*.parquet"), [], r"train: no \*\.parquet files"),
    "no label column": (_drop_tag("label", "target"), [],
                        r"schema\.pbtxt: expected exactly one column tagged 'target'"),
    "no target item": (_both(_drop_tag("item_id", "target_item"),
                             _drop_tag("category_id", "target_item")), [],
                       r"train/schema\.pbtxt: the schema has no column tagged 'target_item'"),
    "histories of different lengths": (
        _edit_column("category_id_history", (r"min: 20\n    max: 20", "min: 19\n    max: 19"),
                     (r"number_value: 20\.0", "number_value: 19.0")), [],
        r"train/schema\.pbtxt: history columns have different lengths"),
    "history features not matching the target's": (
        _drop_tag("category_id_history", "history"), [],
        r"train/schema\.pbtxt: history features \['item_id'\] do not pair with the target item "
        r"features \['item_id', 'category_id'\]"),
    "schema column missing from the parquet": (_rewrite_parquet(_drop_column), [],
                                               r"\['category_id_neg_history'\] are in "
                                               r"schema\.pbtxt but not in the parquet files"),
    "ids beyond the schema's domain": (
        _edit_column("item_id_history", (r'(int_domain \{\n    name: "item_id"\n    max: )\d+',
                                         r"\g<1>10")), [],
        r"train: column 'item_id_history': \d+ id\(s\) outside the schema's domain \[0, 10\]"),
    "NaN label": (_rewrite_parquet(_nan_label), [],
                  r"train: column 'label': 1 value\(s\) are NaN or infinite"),
    "label other than 0 or 1": (_rewrite_parquet(_label_two), [],
                                r"train: column 'label' is the label .*expected 0 or 1, got 1 "
                                r"other value\(s\) \(e\.g\. 2\)"),
    "history row of the wrong length": (_rewrite_parquet(_short_history_row), [],
                                        r"column 'item_id_history': rows have list lengths "
                                        r"\[19, 20\]"),
    "missing checkpoint": (None, ["--load_checkpoint_path", "{tmp}/nothing"],
                           r"--load_checkpoint_path .*nothing: no checkpoint found"),
}


@pytest.fixture(scope="module")
def fit_main():
    from sim_merlin import fit

    return fit.main


def _copy(dataset: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    return data


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_bad_training_data_is_named(case, tiny_dataset, tmp_path, capsys, fit_main):
    damage, options, message = FIT_CASES[case]
    data = _copy(tiny_dataset, tmp_path)
    if damage is not None:
        damage(data)
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    status = fit_main(["--dataset_dir", str(data), "--results_dir", str(tmp_path / "results"),
                       "--epochs", "1", "--save_checkpoint_path", str(tmp_path / "ckpt"),
                       *SMALL, *options])
    error = capsys.readouterr().err
    assert status == 2, error
    assert re.search(message, error), error
    assert "Traceback" not in error
    assert not list(tmp_path.glob("ckpt/*.index"))  # nothing was trained


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory, fit_main):
    """One epoch of a small SIM with a checkpoint and an export."""
    out = tmp_path_factory.mktemp("trained")
    assert fit_main(["--dataset_dir", str(tiny_dataset), "--results_dir", str(out / "results"),
                     "--epochs", "1", "--save_checkpoint_path", str(out / "ckpt"),
                     "--export_dir", str(out / "export"), *SMALL]) == 0
    return out


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("case, options, message", [
    ("checkpoint of another model configuration",
     ["--load_checkpoint_path", "{out}/ckpt", "--embedding_dim", "8"],
     r"--load_checkpoint_path .*ckpt: saved with a different model configuration "
     r"\(embedding_dim: 4 there, 8 here\)"),
    ("export directory exists", ["--export_dir", "{out}/export"],
     r"--export_dir .*export already exists; choose another or pass --overwrite"),
    ("checkpoint directory of another run", ["--save_checkpoint_path", "{out}/ckpt"],
     r"--save_checkpoint_path .*ckpt holds another run's checkpoints; pass "
     r"--load_checkpoint_path .*ckpt to resume it, or --overwrite"),
    ("a loss that diverges",
     ["--load_checkpoint_path", "{out}/ckpt", "--save_checkpoint_path", "{out}/ckpt",
      "--lr", "1e38"],
     r"the loss became (nan|inf|-inf) at epoch 1 step \d+; stopped \(the last checkpoint, if "
     r"any, is the last good state"),
])
def test_refused_outputs_and_checkpoints_are_left_untouched(case, options, message, trained,
                                                            tiny_dataset, capsys, fit_main):
    before = {name: _tree(trained / name) for name in ("ckpt", "export")}
    options = [o.replace("{out}", str(trained)) for o in options]
    status = fit_main(["--dataset_dir", str(tiny_dataset), "--results_dir",
                       str(trained / "again"), "--epochs", "2", *SMALL, *options])
    error = capsys.readouterr().err
    assert status == 2, error
    assert re.search(message.replace(" ", r"\s+"), error), error
    assert {name: _tree(trained / name) for name in ("ckpt", "export")} == before


def test_an_unfinished_checkpoint_save_is_ignored(trained, tiny_dataset, tmp_path, capsys,
                                                  fit_main):
    """A save killed half-way leaves files of a newer checkpoint that the ``checkpoint`` state
    file (replaced atomically, last) does not name: resuming takes the last complete one."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt)
    (complete,) = ckpt.glob("ckpt-*.index")
    (ckpt / "ckpt-1.index").write_bytes(complete.read_bytes()[:40])
    (ckpt / "ckpt-1.data-00000-of-00001").write_bytes(b"\0" * 100)
    status = fit_main(["--mode", "evaluate", "--dataset_dir", str(tiny_dataset), "--results_dir",
                       str(tmp_path / "eval"), "--load_checkpoint_path", str(ckpt), *SMALL])
    output = capsys.readouterr().out
    assert status == 0
    assert re.search(rf"restored {re.escape(str(ckpt / complete.stem))} \(epoch 0, step \d+\)",
                     output), output


def test_overwrite_replaces_an_export_and_leaves_no_work_files(trained, tiny_dataset, tmp_path,
                                                               capsys, fit_main):
    export = tmp_path / "export"
    export.mkdir()
    (export / "earlier.txt").write_text("an earlier export")
    status = fit_main(["--mode", "export", "--dataset_dir", str(tiny_dataset), "--results_dir",
                       str(tmp_path / "results"), "--load_checkpoint_path",
                       str(trained / "ckpt"), "--export_dir", str(export), "--overwrite", *SMALL])
    assert status == 0, capsys.readouterr().err
    assert (export / "saved_model.pb").exists() and not (export / "earlier.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "results"]


def test_an_export_killed_between_its_renames_is_cleaned_up_by_the_next(
        trained, tiny_dataset, tmp_path, capsys, fit_main):
    # What a kill between "old export aside" and "new export in" leaves: no export, the new
    # one under the staging name, the old one under the aside name; both of a dead process.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f".export.partial-{dead.pid}", f".export.partial-{dead.pid}.replaced"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "saved_model.pb").write_text("half")
    (tmp_path / ".export.partial-1").mkdir()  # a live process's (pid 1): left alone
    status = fit_main(["--mode", "export", "--dataset_dir", str(tiny_dataset), "--results_dir",
                       str(tmp_path / "results"), "--load_checkpoint_path",
                       str(trained / "ckpt"), "--export_dir", str(tmp_path / "export"), *SMALL])
    output = capsys.readouterr().out
    assert status == 0
    assert f".export.partial-{dead.pid}.replaced (left by an interrupted export)" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.partial-1", "export",
                                                          "results"]
    assert (tmp_path / "export" / "saved_model.pb").stat().st_size > 100
