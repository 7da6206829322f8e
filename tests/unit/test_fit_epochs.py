"""``python -m sim_merlin.fit`` across epochs: the next epoch's loader starts reading before the
epoch ends, and the batches come in the order epoch-by-epoch loaders give."""
import numpy as np
import pytest

from fit_helpers import make_preprocessed
from sim_merlin.datasets.synthetic import SyntheticConfig


@pytest.fixture(scope="module")
def partitioned_dataset(tmp_path_factory):
    """Several partitions, so a loader reads several chunks per epoch."""
    return make_preprocessed(tmp_path_factory.mktemp("partitioned"),
                             SyntheticConfig(users=160, items=1200, categories=12, seed=8), 10,
                             users_per_partition=40)


def test_next_epochs_loader_starts_early_and_batches_keep_their_order(partitioned_dataset,
                                                                      tmp_path, monkeypatch):
    import sim_merlin.fit as fit
    from sim_merlin.training.data import open_split
    from sim_merlin.training.trainer import Trainer

    events, seen = [], []
    train_step, epoch_loader = Trainer.train_step, fit.Run._epoch_loader

    def recording_step(self, features, labels):
        seen.append(features["item_id"].numpy().reshape(-1).copy())
        events.append("step")
        return train_step(self, features, labels)

    def recording_loader(self, train, epoch):
        events.append(("loader", epoch))
        return epoch_loader(self, train, epoch)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    monkeypatch.setattr(fit.Run, "_epoch_loader", recording_loader)
    split = open_split(str(partitioned_dataset / "train"))
    assert len(split.partition_rows) >= 3
    assert fit.main(["--model_type", "din", "--dataset_dir", str(partitioned_dataset),
                     "--results_dir", str(tmp_path), "--global_batch_size", "32",
                     "--epochs", "3", "--seed", "4", "--no_train_eval", "--embedding_dim", "4",
                     "--long_seq_length", "8",
                     "--print_every", "0", "--progress", "off"]) == 0
    steps = split.batches(32)
    assert len(seen) == 3 * steps
    # Epoch e + 1's loader was made (and began reading) during epoch e, not after its last step.
    for epoch in (1, 2):
        made = events.index(("loader", epoch))
        assert events[:made].count("step") < epoch * steps
    # The same batches, in the same order, as loaders made one after the other.
    expected = []
    for epoch in range(3):
        loader = split.loader(32, shuffle=True, seed=4 + 1_000_003 * epoch)
        expected += [f["item_id"].numpy().reshape(-1) for f, _ in loader]
    assert len(expected) == len(seen)
    for got, want in zip(seen, expected):
        np.testing.assert_array_equal(got, want)
