"""The real ``python -m sim_merlin.fit`` command on a tiny preprocessed data set: one trained run,
then its log, evaluation, predictions and export. (Resuming: test_fit_resume.py; the other modes
and options: test_fit_modes.py; several processes: test_fit_distributed.py.)"""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from fit_helpers import (
    EPOCH_KEYS,
    METADATA,
    SMALL_SIM,
    STEP_KEYS,
    SUMMARY_KEYS,
    events,
    parquet_rows,
    run_fit,
    steps_of,
)

from sim_merlin.training.metrics import roc_auc, thresholded_roc_auc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """SIM trained for 2 epochs with checkpoints and an export."""
    out = tmp_path_factory.mktemp("trained")
    run_fit("--dataset_dir", tiny_dataset, "--results_dir", out, "--global_batch_size", 256,
            "--epochs", 2, "--seed", 11, "--save_checkpoint_path", out / "ckpt",
            "--export_dir", out / "export", *SMALL_SIM)
    return out


@pytest.mark.compat_lock
def test_train_writes_the_reference_log(trained, tiny_dataset):
    log = trained / "log.json"
    assert [e["metric"] for e in events(log, "METADATA")] == METADATA
    train_rows = len(parquet_rows(tiny_dataset / "train"))
    steps_per_epoch = -(-train_rows // 256)
    step_lines = steps_of(log, 2)
    assert [e["step"] for e in step_lines] == [[epoch, step] for epoch in range(2)
                                              for step in range(steps_per_epoch)]
    for line in step_lines:
        data = line["data"]
        assert set(data) == STEP_KEYS
        assert data["total_loss"] == pytest.approx(data["classification_loss"]
                                                   + data["dien_aux_loss"], rel=1e-5)
        assert data["samples/s"] > 0
    first, last = step_lines[0]["data"], step_lines[-5:]
    assert np.mean([e["data"]["total_loss"] for e in last]) < first["total_loss"]
    epochs = steps_of(log, 1)
    assert [e["step"] for e in epochs] == [[0], [1]]
    test_rows = len(parquet_rows(tiny_dataset / "test"))
    for line in epochs:
        assert EPOCH_KEYS <= set(line["data"])
        assert line["data"]["test_samples"] == test_rows
        assert line["data"]["train_samples"] == train_rows
        assert 0 <= line["data"]["test_auc"] <= 1
    (summary,) = steps_of(log, 0)
    assert SUMMARY_KEYS <= set(summary["data"])
    assert summary["data"]["test_auc"] == epochs[-1]["data"]["test_auc"]
    assert summary["data"]["time_to_train"] > 0
    assert summary["data"]["train_auc"] > 0.6  # the synthetic data is learnable


def test_evaluate_and_predict_agree_with_training(trained, tiny_dataset):
    """Evaluating the checkpoint gives the last epoch's test AUC and loss; predict's scores give
    the same AUC computed independently."""
    out = trained / "evaluate"
    run_fit("--mode", "evaluate", "--dataset_dir", tiny_dataset, "--results_dir", out,
            "--global_batch_size", 256, "--load_checkpoint_path", trained / "ckpt", *SMALL_SIM)
    (evaluation,) = steps_of(out / "log.json", 0)
    (summary,) = steps_of(trained / "log.json", 0)
    assert evaluation["data"]["test_auc"] == pytest.approx(summary["data"]["test_auc"],
                                                           abs=1e-12)
    assert evaluation["data"]["test_loss"] == pytest.approx(summary["data"]["test_loss"],
                                                            rel=1e-9)

    predictions = trained / "predictions.parquet"
    run_fit("--mode", "predict", "--dataset_dir", tiny_dataset, "--results_dir", trained,
            "--predict_input", tiny_dataset / "test", "--predict_output", predictions,
            "--global_batch_size", 256, "--load_checkpoint_path", trained / "ckpt", *SMALL_SIM)
    scored = pd.read_parquet(predictions)
    test = parquet_rows(tiny_dataset / "test")
    assert len(scored) == len(test)
    np.testing.assert_array_equal(scored["label"].to_numpy(), test["label"].to_numpy())
    np.testing.assert_array_equal(scored["user_id"].to_numpy(), test["user_id"].to_numpy())
    np.testing.assert_array_equal(scored["item_id"].to_numpy(), test["item_id"].to_numpy())
    probability = 1 / (1 + np.exp(-scored["logit"].to_numpy(np.float64)))
    np.testing.assert_allclose(scored["probability"], probability, rtol=1e-6)
    assert roc_auc(test["label"], scored["logit"]) == pytest.approx(
        summary["data"]["test_auc"], abs=1e-12)
    assert thresholded_roc_auc(test["label"], scored["probability"]) == pytest.approx(
        summary["data"]["test_auc_8000"], abs=1e-6)


RELOAD = """
import sys, json, glob
import numpy as np, pandas as pd, tensorflow as tf
frame = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(sys.argv[2] + "/*.parquet"))])
frame = frame.iloc[:200]
serving = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
names = sorted(serving.structured_input_signature[1])
features = {}
for name in names:
    values = frame[name].to_numpy()
    if values.dtype == object:
        values = np.stack(values)
    spec = serving.structured_input_signature[1][name]
    features[name] = tf.constant(values, dtype=spec.dtype)
scores = list(serving(**features).values())[0].numpy().ravel()
json.dump({"names": names, "signature": scores.tolist()}, open(sys.argv[3], "w"))
"""


def saved_variables(export_dir):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(export_dir / "variables" / "variables"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def test_export_reloads_in_a_fresh_process(trained, tiny_dataset, tmp_path):
    """--mode export writes the last checkpoint's weights, the same as the SavedModel written
    after training; it reloads in a new process, without this package, and scores like the
    trained model. (Reloading as a Keras model: tests/unit/models/test_models.py.)"""
    run_fit("--mode", "export", "--dataset_dir", tiny_dataset, "--results_dir", tmp_path,
            "--global_batch_size", 256, "--load_checkpoint_path", trained / "ckpt",
            "--export_dir", tmp_path / "export", *SMALL_SIM)
    after_training, exported = saved_variables(trained / "export"), saved_variables(
        tmp_path / "export")
    assert len(exported) > 10 and exported.keys() == after_training.keys()
    for name, value in exported.items():
        np.testing.assert_array_equal(value, after_training[name], err_msg=name)

    result = tmp_path / "reloaded.json"
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "export"),
                    str(tiny_dataset / "test"), str(result)], check=True, timeout=300,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    reloaded = json.loads(result.read_text())
    test = parquet_rows(tiny_dataset / "test")
    assert reloaded["names"] == sorted(c for c in test.columns if c != "label")
    scored = pd.read_parquet(trained / "predictions.parquet") if (
        trained / "predictions.parquet").exists() else None
    if scored is None:  # the predict test did not run first
        run_fit("--mode", "predict", "--dataset_dir", tiny_dataset, "--results_dir", tmp_path,
                "--predict_input", tiny_dataset / "test", "--global_batch_size", 256,
                "--load_checkpoint_path", trained / "ckpt", *SMALL_SIM)
        scored = pd.read_parquet(tmp_path / "predictions.parquet")
    expected = scored["probability"].to_numpy()[:200]
    np.testing.assert_allclose(reloaded["signature"], expected, rtol=1e-5, atol=1e-6)
