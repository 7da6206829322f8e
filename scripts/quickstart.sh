#!/usr/bin/env bash
# README command 1: set up .venv (idempotent) and run the main job on the built-in default data.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(command -v python3.11 || command -v python3)
"$PYTHON" scripts/setup_env.py --lock tf2.21
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
.venv/bin/python -m sim_merlin
echo "== 1/3 generating the built-in data set (Amazon 2014 layout) into data/raw"
.venv/bin/python -m sim_merlin.datasets.synthetic --out data/raw --overwrite
.venv/bin/python -m sim_merlin.datasets.statistics \
  --reviews data/raw/reviews_Books.json --meta data/raw/meta_Books.json
echo "== 2/3 preprocessing with NVTabular into data/processed"
.venv/bin/python workflows/preprocess.py --reviews data/raw/reviews_Books.json \
  --meta data/raw/meta_Books.json --output data/processed --overwrite
echo "== 3/3 training and evaluating SIM on it (results/quickstart: log, checkpoint, SavedModel)"
.venv/bin/python -m sim_merlin.fit --dataset_dir data/processed --results_dir results/quickstart \
  --global_batch_size 4096 --epochs 2 --seed 1 --no_train_eval --overwrite \
  --save_checkpoint_path results/quickstart/checkpoints --export_dir results/quickstart/saved_model
