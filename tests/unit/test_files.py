"""sim_merlin.files: outputs replaced whole, never half-written."""
import json
import os

from sim_merlin.files import replace_directory, write_json_atomic


def _make(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)


def test_replace_directory_swaps_an_existing_target(tmp_path):
    _make(tmp_path / "new", {"a": "new a"})
    _make(tmp_path / "out", {"a": "old a", "b": "old b"})
    replace_directory(tmp_path / "new", tmp_path / "out", tmp_path / ".out.old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_text() for p in (tmp_path / "out").iterdir()} == {"a": "new a"}


def test_replace_directory_without_a_target(tmp_path):
    _make(tmp_path / "new", {"a": "new a"})
    replace_directory(tmp_path / "new", tmp_path / "out", tmp_path / ".out.old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "a").read_text() == "new a"


def test_write_json_atomic_leaves_only_the_file(tmp_path):
    write_json_atomic(tmp_path / "c.json", {"b": [1, 2], "a": None})
    write_json_atomic(tmp_path / "c.json", {"b": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]
    assert json.loads((tmp_path / "c.json").read_text()) == {"b": 3}


def test_write_json_atomic_keeps_the_old_file_when_it_fails_and_clears_leftovers(tmp_path):
    import subprocess
    import sys

    import pytest

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"c.json.partial-{dead.pid}").write_text("{half")  # a killed writer's
    write_json_atomic(tmp_path / "c.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "c.json", {"a": object()})  # not JSON
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": 1}


def test_remove_abandoned_deletes_only_what_dead_processes_left(tmp_path):
    import subprocess
    import sys

    from sim_merlin.files import remove_abandoned

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = [f".out.partial-{dead.pid}", f".out.partial-{dead.pid}.replaced",
             f".out.partial-{os.getpid()}", ".out.partial-1", ".out.partial-x", "out"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / f"table.parquet.partial-{dead.pid}").write_text("half a file")
    assert remove_abandoned(tmp_path, ".out.partial-") == names[:2]
    assert remove_abandoned(tmp_path, "table.parquet.partial-") == [
        f"table.parquet.partial-{dead.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
