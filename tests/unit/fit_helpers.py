"""Shared by the tests of ``python -m sim_merlin.fit``: the data sets they train on, running
it and reading its log."""
import glob
import os
import subprocess
import sys

import pandas as pd

from sim_merlin.datasets.synthetic import SyntheticConfig, generate
from sim_merlin.preprocessing.pipeline import PreprocessConfig, preprocess
from sim_merlin.training.logger import read_log

SMALL_SIM = ["--embedding_dim", "4", "--long_seq_length", "15", "--top_k", "6", "--esu_heads",
             "2", "--stage_one_mlp_dims", "16", "--stage_two_mlp_dims", "16,8",
             "--aux_mlp_dims", "8", "--print_every", "0", "--progress", "off"]
STEP_KEYS = {"total_loss", "classification_loss", "dien_aux_loss", "samples/s"}
PERFORMANCE_KEYS = {"throughput", "time", "latency_mean", "latency_p90", "latency_p95",
                    "latency_p99"}
EPOCH_KEYS = PERFORMANCE_KEYS | {"train_auc", "train_loss", "test_auc", "test_loss"}
SUMMARY_KEYS = {"time_to_train", "train_auc", "train_loss", "test_auc", "test_loss"}
METADATA = ["test_auc", "latency_p90", "train_loss", "time_to_train", "throughput"]


def make_preprocessed(root, synthetic: SyntheticConfig, history_length: int, **options):
    """Generate built-in data under ``root`` and preprocess it with the real pipeline
    (``options``: more :class:`PreprocessConfig` fields)."""
    generate(synthetic, root / "raw")
    preprocess(PreprocessConfig(reviews=root / "raw" / "reviews_Books.json",
                                meta=root / "raw" / "meta_Books.json", output=root / "data",
                                max_sequence_length=history_length, **options))
    return root / "data"


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
