"""The real ``python -m sim_merlin.fit`` command on a tiny preprocessed data set."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from sim_merlin.training.logger import read_log
from sim_merlin.training.metrics import roc_auc, thresholded_roc_auc

SMALL_SIM = ["--embedding_dim", "4", "--long_seq_length", "15", "--top_k", "6", "--esu_heads",
             "2", "--stage_one_mlp_dims", "16", "--stage_two_mlp_dims", "16,8",
             "--aux_mlp_dims", "8", "--print_every", "0", "--progress", "off"]
STEP_KEYS = {"total_loss", "classification_loss", "dien_aux_loss", "samples/s"}
PERFORMANCE_KEYS = {"throughput", "time", "latency_mean", "latency_p90", "latency_p95",
                    "latency_p99"}
EPOCH_KEYS = PERFORMANCE_KEYS | {"train_auc", "train_loss", "test_auc", "test_loss"}
SUMMARY_KEYS = {"time_to_train", "train_auc", "train_loss", "test_auc", "test_loss"}
METADATA = ["test_auc", "latency_p90", "train_loss", "time_to_train", "throughput"]


def fit_command(*args):
    return [sys.executable, "-m", "sim_merlin.fit", *map(str, args)]


def run_fit(*args, expect=0):
    done = subprocess.run(fit_command(*args), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def events(path, kind="LOG"):
    return [e for e in read_log(path) if e["type"] == kind]


def steps_of(log, depth):
    return [e for e in events(log) if len(e["step"]) == depth]


def parquet_rows(split_dir):
    files = sorted(glob.glob(os.path.join(split_dir, "*.parquet")))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


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
import sim_merlin
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
by_signature = list(serving(**features).values())[0].numpy().ravel()
again = tf.saved_model.load(sys.argv[4]).signatures["serving_default"]
by_export_mode = list(again(**features).values())[0].numpy().ravel()
from sim_merlin.models import load_model
by_keras = load_model(sys.argv[1]).predict(features, verbose=0).ravel()
json.dump({"names": names, "keras": by_keras.tolist(), "signature": by_signature.tolist(),
           "export_mode": by_export_mode.tolist()},
          open(sys.argv[3], "w"))
"""


def test_export_reloads_in_a_fresh_process(trained, tiny_dataset, tmp_path):
    """The SavedModel written after training and the one --mode export writes from the last
    checkpoint reload in a new process and score like the trained model."""
    run_fit("--mode", "export", "--dataset_dir", tiny_dataset, "--results_dir", tmp_path,
            "--global_batch_size", 256, "--load_checkpoint_path", trained / "ckpt",
            "--export_dir", tmp_path / "export", *SMALL_SIM)
    result = tmp_path / "reloaded.json"
    subprocess.run([sys.executable, "-c", RELOAD, str(trained / "export"),
                    str(tiny_dataset / "test"), str(result), str(tmp_path / "export")],
                   check=True, timeout=300)
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
    np.testing.assert_allclose(reloaded["keras"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reloaded["signature"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reloaded["export_mode"], expected, rtol=1e-5, atol=1e-6)


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


def test_inference_and_benchmark_log_the_reference_keys(tiny_dataset, tmp_path):
    run_fit("--mode", "inference", "--model_type", "din", "--dataset_dir", tiny_dataset,
            "--results_dir", tmp_path / "inference", "--global_batch_size", 128,
            "--benchmark_warmup_steps", 2, "--benchmark_steps", 3, *SMALL_SIM)
    log = tmp_path / "inference" / "log.json"
    assert [e["step"] for e in steps_of(log, 2)] == [[0, s] for s in range(5)]
    assert all(set(e["data"]) == {"samples/s"} for e in steps_of(log, 2))
    (summary,) = steps_of(log, 0)
    assert set(summary["data"]) == PERFORMANCE_KEYS

    run_fit("--benchmark", "--model_type", "dien", "--dataset_dir", tiny_dataset,
            "--results_dir", tmp_path / "benchmark", "--global_batch_size", 128, "--epochs", 3,
            "--benchmark_warmup_steps", 2, "--benchmark_steps", 4,
            "--save_checkpoint_path", tmp_path / "no-ckpt", *SMALL_SIM)
    log = tmp_path / "benchmark" / "log.json"
    assert [e["step"] for e in steps_of(log, 2)] == [[0, s] for s in range(6)]
    assert steps_of(log, 1) == []  # no evaluation in benchmark mode
    (summary,) = steps_of(log, 0)
    assert set(summary["data"]) == PERFORMANCE_KEYS
    assert summary["data"]["throughput"] > 0
    assert not (tmp_path / "no-ckpt").exists()


@pytest.mark.parametrize("flags", [["--amp"], ["--xla"], ["--amp", "--amp_dtype", "float16"]],
                         ids=["amp", "xla", "amp-float16"])
def test_amp_and_xla_train_with_finite_loss(tiny_dataset, tmp_path, flags):
    done = run_fit(*flags, "--dataset_dir", tiny_dataset, "--results_dir", tmp_path,
                   "--global_batch_size", 256, "--epochs", 1, "--no_train_eval", "--seed", 3,
                   *SMALL_SIM, "--progress", "on")
    policy = "mixed_float16" if "float16" in flags else "mixed_bfloat16" if "--amp" in flags \
        else "float32"
    assert f"precision {policy}" in done.stdout  # --amp on a CPU: bfloat16 unless asked
    assert "epoch 0" in done.stderr  # the progress bar
    losses = [e["data"]["total_loss"] for e in steps_of(tmp_path / "log.json", 2)]
    assert losses and np.isfinite(losses).all()
    (summary,) = steps_of(tmp_path / "log.json", 0)
    assert 0 <= summary["data"]["test_auc"] <= 1


def test_bad_options_are_named(tiny_dataset, tmp_path):
    done = run_fit("--dataset_dir", tiny_dataset, "--results_dir", tmp_path,
                   "--long_seq_length", 25, expect=2)
    assert "--long_seq_length must be in 1 .. 19" in done.stderr
    done = run_fit("--dataset_dir", tmp_path / "missing", "--results_dir", tmp_path, expect=2)
    assert str(tmp_path / "missing" / "train") in done.stderr
    done = run_fit("--global_batch_size", 0, "--dataset_dir", tiny_dataset, expect=2)
    assert "--global_batch_size must be positive" in done.stderr
