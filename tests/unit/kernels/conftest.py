"""Running a script in a fresh process whose TensorFlow has a one-thread intra-op pool (the
kernels then use threads of their own: parallel.h)."""
import subprocess
import sys

import pytest

PRELUDE = """
import numpy as np
import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
from sim_merlin.kernels.build import load
lib = load()
"""


@pytest.fixture
def run_with_one_intra_op_thread(tmp_path):
    def run(body: str) -> str:
        script = tmp_path / "script.py"
        script.write_text(PRELUDE + body)
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout
    return run
