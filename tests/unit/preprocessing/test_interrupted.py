"""workflows/preprocess.py killed (SIGKILL) in each of its stages: no output that looks complete
is left, and a rerun gives byte for byte the output of a run that was never interrupted."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sim_merlin.datasets.synthetic import SyntheticConfig, generate

ROOT = Path(__file__).resolve().parents[3]
STAGES = ("read", "filter users", "encode", "group", "train samples", "test samples")

pytestmark = pytest.mark.slow


def command(raw: Path, output: Path):
    return [sys.executable, str(ROOT / "workflows" / "preprocess.py"),
            "--reviews", str(raw / "reviews_Books.json"), "--meta", str(raw / "meta_Books.json"),
            "--output", str(output), "--max_sequence_length", "20", "--seed", "7",
            "--workers", "2", "--users_per_partition", "50"]


def tree(path: Path) -> dict:
    """Every file under ``path``, by relative name, with its bytes."""
    return {str(file.relative_to(path)): file.read_bytes()
            for file in sorted(path.rglob("*")) if file.is_file()}


def kill_during(stage: str, raw: Path, output: Path) -> None:
    """Start the command and SIGKILL it as soon as it announces ``stage``."""
    process = subprocess.Popen(command(raw, output), stderr=subprocess.PIPE, text=True,
                               stdout=subprocess.DEVNULL,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.time() + 300
    for line in process.stderr:
        if line.startswith(f"[preprocess] {stage} ..."):
            break
        assert time.time() < deadline
    else:
        pytest.fail(f"the run ended before stage {stage!r}: exit {process.wait()}")
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    generate(SyntheticConfig(users=400, items=2000, categories=20, seed=4), root)
    return root


def test_a_rerun_after_kills_in_every_stage_gives_the_uninterrupted_output(raw, tmp_path):
    output = tmp_path / "out"
    subprocess.run(command(raw, output), check=True, capture_output=True)
    expected = tree(output)
    assert {"preprocess.json", "workflow/workflow.pkl", "workflow/metadata.json",
            "train/schema.pbtxt", "test/schema.pbtxt"} <= set(expected)
    assert any(name.endswith(".parquet") for name in expected)
    shutil.rmtree(output)

    for stage in STAGES:
        kill_during(stage, raw, output)
        assert not output.exists(), f"killed in {stage!r}: an output directory exists"
        assert [p.name for p in tmp_path.iterdir()] == [".out.partial"]
    done = subprocess.run(command(raw, output), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "left by an interrupted run, process" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # work files cleaned up
    assert tree(output) == expected


def test_overwrite_killed_before_the_swap_keeps_the_old_output(raw, tmp_path):
    """--overwrite builds the new output aside: killed before it is complete, the old output is
    still there, whole."""
    output = tmp_path / "out"
    subprocess.run(command(raw, output), check=True, capture_output=True)
    before = tree(output)
    process = subprocess.Popen([*command(raw, output), "--overwrite"], stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    for line in process.stderr:
        if line.startswith("[preprocess] test samples ..."):
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert tree(output) == before
