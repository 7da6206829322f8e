"""``python -m sim_merlin.fit`` killed (SIGKILL) after a checkpoint, then resumed."""
import glob
import os
import signal
import subprocess
import time

import pytest
from fit_helpers import SMALL_SIM, fit_command, parquet_rows, run_fit

from sim_merlin.training.logger import read_log

pytestmark = pytest.mark.slow


def checkpoint_values(directory):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(directory))
    names = reader.get_variable_to_shape_map()
    iterations = [n for n in names if n.startswith("optimizer/") and "iter" in n]
    return {"epoch": int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")),
            "step": int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")),
            "iterations": int(reader.get_tensor(iterations[0]))}


def test_killed_run_resumes_with_its_counters(tiny_dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    common = ["--dataset_dir", tiny_dataset, "--results_dir", tmp_path, "--global_batch_size",
              64, "--epochs", 4, "--seed", 5, "--save_checkpoint_path", ckpt,
              "--no_train_eval", *SMALL_SIM]
    process = subprocess.Popen(fit_command(*common), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.time() + 300
    while not (ckpt / "checkpoint").exists() and time.time() < deadline:
        assert process.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    saved = checkpoint_values(ckpt)
    assert saved["epoch"] < 3
    train_rows = len(parquet_rows(tiny_dataset / "train"))
    steps_per_epoch = -(-train_rows // 64)
    assert saved["step"] == saved["iterations"] == steps_per_epoch * (saved["epoch"] + 1)
    before = read_log(tmp_path / "log.json")

    run_fit(*common, "--load_checkpoint_path", ckpt)
    resumed = [e for e in read_log(tmp_path / "log.json")[len(before):] if e["type"] == "LOG"]
    resumed_steps = [e for e in resumed if len(e["step"]) == 2]
    assert resumed_steps[0]["step"] == [saved["epoch"] + 1, 0]
    assert [e["step"] for e in resumed if len(e["step"]) == 1] == [
        [epoch] for epoch in range(saved["epoch"] + 1, 4)]
    final = checkpoint_values(ckpt)
    assert final == {"epoch": 3, "step": 4 * steps_per_epoch, "iterations": 4 * steps_per_epoch}
    first_ever = next(e for e in before if e["type"] == "LOG" and e["step"] == [0, 0])
    assert resumed_steps[0]["data"]["total_loss"] < first_ever["data"]["total_loss"]
    assert len(glob.glob(str(ckpt / "ckpt-*.index"))) == 1  # --keep_checkpoints 1
