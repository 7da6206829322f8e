"""``--deterministic``: two separate runs with the same seed give the same losses at every step
and the same final weights, bit for bit."""
import numpy as np
import pytest
from fit_helpers import SMALL_SIM, run_fit, steps_of

pytestmark = pytest.mark.slow


def checkpoint_arrays(directory):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(directory))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "VARIABLE_VALUE" in name}


@pytest.mark.parametrize("model_type", ["sim", "dien"])
def test_two_deterministic_runs_are_identical(model_type, tiny_dataset, tmp_path):
    runs = []
    for run in ("first", "second"):
        out = tmp_path / run
        run_fit("--model_type", model_type, "--dataset_dir", tiny_dataset, "--results_dir", out,
                "--save_checkpoint_path", out / "ckpt", "--global_batch_size", 64,
                "--epochs", 2, "--seed", 9, "--deterministic", "--no_train_eval", *SMALL_SIM)
        losses = [e["data"]["total_loss"] for e in steps_of(out / "log.json", 2)]
        runs.append((losses, checkpoint_arrays(out / "ckpt")))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert len(losses_a) > 10 and np.isfinite(losses_a).all()
    assert losses_a == losses_b
    assert sorted(weights_a) == sorted(weights_b)
    assert any(name.startswith("optimizer/") for name in weights_a)  # the optimizer state too
    for name, value in weights_a.items():
        np.testing.assert_array_equal(value, weights_b[name], err_msg=name)
