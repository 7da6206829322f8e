"""``horovodrun -np 2 --gloo python -m sim_merlin.fit`` on CPU, checked against one process."""
import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fit_helpers import SMALL_SIM

from sim_merlin.datasets.synthetic import SyntheticConfig, generate
from sim_merlin.preprocessing.pipeline import PreprocessConfig, preprocess
from sim_merlin.training.logger import read_log

pytestmark = pytest.mark.slow
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def horovodrun(*args, timeout=420, expect_success=True):
    launcher = Path(sys.executable).parent / "horovodrun"
    command = [str(launcher), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
               "sim_merlin.fit", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)
    output = f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert (done.returncode == 0) == expect_success, output
    return done


def single(*args):
    done = subprocess.run([sys.executable, "-m", "sim_merlin.fit", *map(str, args)],
                          capture_output=True, text=True, timeout=420, env=ENV)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def summary(log):
    (line,) = [e for e in read_log(log) if e["type"] == "LOG" and e["step"] == []]
    return line["data"]


@pytest.fixture(scope="module")
def uneven_dataset(tmp_path_factory):
    """Three partitions of 50 users each (unequal rows), history 20."""
    root = tmp_path_factory.mktemp("uneven")
    generate(SyntheticConfig(users=150, items=1500, categories=15, seed=4), root / "raw")
    preprocess(PreprocessConfig(reviews=root / "raw" / "reviews_Books.json",
                                meta=root / "raw" / "meta_Books.json", output=root / "data",
                                max_sequence_length=20, users_per_partition=50))
    sizes = [len(pd.read_parquet(f)) for f in sorted(glob.glob(str(root / "data/train/*.parquet")))]
    assert len(sizes) >= 2 and len(set(sizes)) > 1, sizes
    return root / "data"


def test_two_workers_train_identical_replicas_and_evaluate_exactly(uneven_dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    done = horovodrun("--dataset_dir", uneven_dataset, "--results_dir", tmp_path / "train",
                      "--global_batch_size", 256, "--epochs", 1, "--seed", 9,
                      "--save_checkpoint_path", ckpt, "--no_train_eval", *SMALL_SIM)
    digests = dict(re.findall(r"worker (\d): weights sha256 ([0-9a-f]{64})", done.stdout))
    assert sorted(digests) == ["0", "1"], done.stdout[-3000:]
    assert digests["0"] == digests["1"]
    assert summary(tmp_path / "train" / "log.json")["replica_weights_identical"] is True
    assert not glob.glob(str(tmp_path / "train" / "*.json.*"))  # one log, from rank 0

    horovodrun("--mode", "evaluate", "--dataset_dir", uneven_dataset, "--results_dir",
               tmp_path / "eval2", "--global_batch_size", 256, "--load_checkpoint_path", ckpt,
               *SMALL_SIM)
    single("--mode", "evaluate", "--dataset_dir", uneven_dataset, "--results_dir",
           tmp_path / "eval1", "--global_batch_size", 256, "--load_checkpoint_path", ckpt,
           *SMALL_SIM)
    two, one = summary(tmp_path / "eval2" / "log.json"), summary(tmp_path / "eval1" / "log.json")
    test_rows = sum(len(pd.read_parquet(f))
                    for f in glob.glob(str(uneven_dataset / "test" / "*.parquet")))
    assert two["test_samples"] == one["test_samples"] == test_rows
    assert two["test_auc"] == one["test_auc"]
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-12)


def test_uneven_partition_shards_do_not_hang(uneven_dataset, tmp_path):
    """The dataloader's own split gives the workers different numbers of batches; both must run
    the same number of steps (the smaller) and finish."""
    horovodrun("--dataset_dir", uneven_dataset, "--results_dir", tmp_path, "--sharding",
               "partitions", "--global_batch_size", 128, "--epochs", 2, "--seed", 9,
               "--no_train_eval", *SMALL_SIM, timeout=300)
    from sim_merlin.training.data import open_split

    train = open_split(uneven_dataset / "train")
    batches = [train.batches(64, rank, 2, "partitions") for rank in range(2)]
    assert batches[0] != batches[1]
    steps = [e["step"] for e in read_log(tmp_path / "log.json")
             if e["type"] == "LOG" and len(e["step"]) == 2]
    assert steps == [[epoch, s] for epoch in range(2) for s in range(min(batches))]
    assert summary(tmp_path / "log.json")["replica_weights_identical"] is True


def test_a_rank_with_zero_batches(tiny_dataset, tmp_path):
    """Whole-partition sharding of a one-file split leaves rank 1 with nothing to read:
    evaluation still covers the whole split exactly (rank 1 contributes zero rows), and training,
    which would have zero steps, stops on both ranks with the reason instead of hanging."""
    (test_file,) = glob.glob(str(tiny_dataset / "test" / "*.parquet"))
    ckpt = tmp_path / "ckpt"
    common = ["--dataset_dir", tiny_dataset, "--global_batch_size", 128, *SMALL_SIM]
    single(*common, "--results_dir", tmp_path / "train", "--epochs", 1, "--seed", 2,
           "--save_checkpoint_path", ckpt, "--no_train_eval")
    evaluate = ["--mode", "evaluate", "--load_checkpoint_path", ckpt, "--sharding", "partitions"]
    horovodrun(*common, *evaluate, "--results_dir", tmp_path / "eval2")
    single(*common, *evaluate, "--results_dir", tmp_path / "eval1")
    two, one = summary(tmp_path / "eval2" / "log.json"), summary(tmp_path / "eval1" / "log.json")
    assert two["test_samples"] == one["test_samples"] == len(pd.read_parquet(test_file))
    assert two["test_auc"] == one["test_auc"]
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-12)

    done = horovodrun(*common, "--results_dir", tmp_path / "train2", "--sharding", "partitions",
                      "--epochs", 1, timeout=300, expect_success=False)
    assert "give no training batch of 64 per worker on 2 worker(s)" in done.stdout + done.stderr
