"""``python -m sim_merlin.fit``: inference and benchmark modes, --amp and --xla, bad options."""
import numpy as np
import pytest
from fit_helpers import PERFORMANCE_KEYS, SMALL_SIM, run_fit, steps_of

pytestmark = pytest.mark.slow


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
