"""Every notebook in examples/ runs top to bottom at the small size and is committed clean.

Notebooks read ``SIM_MERLIN_EXAMPLE_SIZE`` in their first code cell ("small" here) and write under
their working directory, a fresh temporary one per notebook. A failing cell fails the test with
that cell's source and traceback.
"""
import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds (horovodrun in 04 takes ~100 s on a busy machine)
NOTEBOOK_TIMEOUT = 480  # seconds; at the small size each takes under a minute on a quiet machine


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernel spec running this interpreter, found first whatever else Jupyter has installed."""
    spec = tmp_path / "jupyter" / "kernels" / "sim-merlin-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 "--InteractiveShell.colors=nocolor"],  # plain tracebacks in test reports
        "display_name": "sim-merlin tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "sim-merlin-test"


@pytest.mark.slow
@pytest.mark.timeout(NOTEBOOK_TIMEOUT)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(path, tmp_path, kernel_name, monkeypatch):
    monkeypatch.setenv("SIM_MERLIN_EXAMPLE_SIZE", "small")
    for variable in ("SIM_MERLIN_EXAMPLE_WORK", "SIM_MERLIN_AMAZON_DIR"):  # defaults: cwd, built-in data
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name=kernel_name, timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(cwd)}})
    started = time.perf_counter()
    failure = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as error:  # says which cell, with its traceback
        failure = f"{path.name}: {error}"
    if failure:
        pytest.fail(failure, pytrace=False)
    print(f"{path.name}: {time.perf_counter() - started:.1f} s at the small size")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_committed_clean(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} have outputs or execution counts; "
                       "clear all outputs before committing")
    first = next(cell.source for cell in notebook.cells if cell.cell_type == "code")
    for variable in ("SIM_MERLIN_EXAMPLE_SIZE", "SIM_MERLIN_EXAMPLE_WORK"):
        assert variable in first, f"{path.name}: the first code cell must read {variable}"
