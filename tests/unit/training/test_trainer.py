"""Trainer steps of SIM, DIN and DIEN against numpy (BCE, one Adam step), XLA, bfloat16;
``binary_cross_entropy`` and ``precision_policy``."""
from types import SimpleNamespace

import numpy as np
import pytest

import sim_merlin  # noqa: F401  (before tensorflow)
import tensorflow as tf

from sim_merlin.models.dien import DIENModel
from sim_merlin.models.din import DINModel
from sim_merlin.models.sim import SIMModel
from sim_merlin.schema import sample_schema
from sim_merlin.kernels import adam as fused_adam
from sim_merlin.training.optimizers import Adam, build_optimizer
from sim_merlin.training.trainer import (Trainer, binary_cross_entropy, precision_policy,
                                         row_blocks)

HISTORY = 6
CARDINALITY = {"item_id": 40, "category_id": 6, "user_id": 12}
LR = 0.01
STEPS = 12  # train steps on one fixed batch
# Small models; a short history of 2 keeps the XLA compilation of the GRUs quick.
MODELS = {
    "sim": lambda schema: SIMModel(schema, embedding_dim=4, short_length=2, top_k=3, esu_heads=1,
                                   stage_one_mlp_dims=(8,), stage_two_mlp_dims=(8,),
                                   aux_mlp_dims=(4,), gru_units=4),
    "din": lambda schema: DINModel(schema, embedding_dim=4, short_length=2, mlp_dims=(8,)),
    "dien": lambda schema: DIENModel(schema, embedding_dim=4, short_length=2, mlp_dims=(8,),
                                     aux_mlp_dims=(4,), gru_units=4),
}


def make_batch(seed, size=16):
    """A batch of the sample schema: left-padded histories, ids >= 1 elsewhere."""
    rng = np.random.default_rng(seed)

    def history(cardinality):
        values = rng.integers(1, cardinality, (size, HISTORY))
        for row, padding in enumerate(rng.integers(0, HISTORY - 1, size)):
            values[row, :padding] = 0
        return tf.constant(values, tf.int32)

    features = {
        "user_id": tf.constant(rng.integers(1, CARDINALITY["user_id"], size), tf.int64),
        "item_id": tf.constant(rng.integers(1, CARDINALITY["item_id"], size), tf.int32),
        "category_id": tf.constant(rng.integers(1, CARDINALITY["category_id"], size), tf.int32),
    }
    for name in ("item_id", "category_id"):
        features[f"{name}_history"] = history(CARDINALITY[name])
        features[f"{name}_neg_history"] = history(CARDINALITY[name])
    labels = tf.constant(rng.permutation(np.arange(size) % 2), tf.int8)  # half positive
    return features, labels


def numpy_bce(labels, logits):
    """Mean BCE the naive way: -(y log p + (1 - y) log(1 - p)), p = sigmoid(logit)."""
    x = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    p = 1.0 / (1.0 + np.exp(-x))
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def numpy_adam_first_step(weights, gradient, lr=LR, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    m = (1 - beta_1) * gradient
    v = (1 - beta_2) * gradient ** 2
    alpha = lr * np.sqrt(1 - beta_2) / (1 - beta_1)
    return weights - alpha * m / (np.sqrt(v) + epsilon)


def classification_logits(block, features, training):
    """The logits the classification loss is made of: SIM's two stages, the others' one logit."""
    if hasattr(block, "forward"):  # SIM
        out = block.forward(features, training=training)
        return [out["stage_one"].numpy(), out["stage_two"].numpy()]
    labels = tf.zeros([features["item_id"].shape[0]])
    return [block.loss_terms(features, labels, training=training)["logit"].numpy()]


@pytest.fixture(scope="module")
def schema():
    return sample_schema({"item_id": CARDINALITY["item_id"],
                          "category_id": CARDINALITY["category_id"]},
                         {"user_id": CARDINALITY["user_id"]}, HISTORY)


@pytest.fixture(scope="module")
def batch():
    return make_batch(0)


def train_fixed_batch(kind, schema, batch):
    """Build one model, record what numpy expects of the first train step, then train STEPS
    steps on one batch (Adam, lr 0.01)."""
    tf.keras.utils.set_random_seed(3)
    features, labels = batch
    model = MODELS[kind](schema)
    trainer = Trainer(model, build_optimizer("adam", LR))
    trainer.build(features)
    initial = model.get_weights()
    trainable = [v.numpy() for v in model.trainable_variables]
    logits = classification_logits(trainer.block, features, training=True)
    with tf.GradientTape() as tape:
        terms = trainer.block.loss_terms(features, tf.cast(labels, tf.float32), training=True)
        objective = terms["classification_loss"] + terms["auxiliary_loss"]
    gradients = [tf.convert_to_tensor(g).numpy()
                 for g in tape.gradient(objective, model.trainable_variables)]
    losses, after_first, after_three = [], None, None
    for step in range(STEPS):
        losses.append(trainer.train_step(features, labels))
        if step == 0:
            trainer.synchronize()  # every deferred Adam row up to date before reading
            after_first = [v.numpy() for v in model.trainable_variables]
        if step == 2:
            after_three = trainer.predict_step(features).numpy()
    return SimpleNamespace(kind=kind, model=model, trainer=trainer, initial=initial,
                           trainable=trainable, logits=logits, gradients=gradients,
                           auxiliary=float(terms["auxiliary_loss"]), losses=losses,
                           after_first=after_first, predictions_after_three=after_three)


@pytest.fixture(scope="module")
def runs(schema, batch):
    """``runs[kind]``: :func:`train_fixed_batch`, once per module and kind."""
    cache = {}

    class Runs:
        def __getitem__(self, kind):
            if kind not in cache:
                cache[kind] = train_fixed_batch(kind, schema, batch)
            return cache[kind]

    return Runs()


@pytest.fixture(params=sorted(MODELS))
def run(request, runs):
    return runs[request.param]


def floats(losses):
    return {k: float(v) for k, v in losses.items()}


# ---------------------------------------------------------------- train_step


def test_train_step_returns_the_three_losses(run):
    first = run.losses[0]
    assert sorted(first) == ["auxiliary_loss", "classification_loss", "total_loss"]
    for name, value in first.items():
        assert value.dtype == tf.float32 and value.shape == (), name
    values = floats(first)
    assert values["total_loss"] == pytest.approx(
        values["classification_loss"] + values["auxiliary_loss"], rel=1e-6, abs=1e-7)
    if run.kind == "din":
        assert values["auxiliary_loss"] == 0.0
    else:
        # DIEN's auxiliary loss: BCE of two logits per position, about 2 ln 2 untrained.
        assert 0.5 < values["auxiliary_loss"] < 3.0
        assert values["auxiliary_loss"] == pytest.approx(run.auxiliary, rel=1e-5)


def test_classification_loss_is_numpy_bce_of_the_logits(run, batch):
    _, labels = batch
    expected = np.mean([numpy_bce(labels.numpy(), logits) for logits in run.logits])
    assert float(run.losses[0]["classification_loss"]) == pytest.approx(expected, rel=1e-5)
    assert len(run.logits) == (2 if run.kind == "sim" else 1)
    # Not a constant: the logits differ across the batch.
    assert np.std(run.logits[-1]) > 1e-4


def test_train_step_applies_one_adam_step_of_the_total_loss(run):
    changed = with_gradient = 0
    for before, after, gradient, variable in zip(run.trainable, run.after_first, run.gradients,
                                                 run.model.trainable_variables):
        expected = numpy_adam_first_step(before.astype(np.float64), gradient.astype(np.float64))
        np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-6, err_msg=variable.name)
        if "target_attention" in variable.name and variable.shape == (1,):
            # DIEN's attention score bias has no gradient in exact arithmetic (a softmax ignores
            # a constant added to every score): the step and this tape get rounding noise, which
            # may differ (0 here, about 1e-12 there) and moves it by a negligible amount.
            continue
        changed += bool((after != before).any())
        with_gradient += bool(np.any(gradient))
    # Every variable with a gradient moved (the embedding tables only in the rows looked up).
    assert changed == with_gradient >= len(run.gradients) - 1 > 5


def test_repeated_steps_on_one_batch_reduce_the_loss(run):
    totals = [float(losses["total_loss"]) for losses in run.losses]
    classification = [float(losses["classification_loss"]) for losses in run.losses]
    assert totals[-1] < totals[0] - 0.02
    assert classification[-1] < classification[0] - 0.01
    assert np.isfinite(totals).all()


def test_predict_step_is_the_logit_of_the_model_output(run, batch):
    features, labels = batch
    logits = run.trainer.predict_step(features).numpy()
    assert logits.dtype == np.float32 and logits.shape == (len(labels),)
    expected = run.trainer.block.loss_terms(features, tf.cast(labels, tf.float32),
                                            training=False)["logit"]
    np.testing.assert_allclose(logits, expected.numpy().reshape(-1), rtol=1e-5, atol=1e-6)
    probabilities = run.model(features, training=False).numpy().reshape(-1)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits.astype(np.float64))), probabilities,
                               rtol=1e-5, atol=1e-6)
    # binary_cross_entropy (used for evaluation) agrees with numpy on these logits.
    assert numpy_bce(labels.numpy(), logits) == pytest.approx(
        binary_cross_entropy(labels.numpy(), logits), rel=1e-9)


@pytest.mark.parametrize("shards", [2, 3])
def test_inference_shards_give_every_row_the_same_score(run, batch, shards):
    # Rows scored in blocks run side by side: the same logits, row for row, even with more
    # blocks than rows (empty blocks).
    features, labels = batch
    whole = run.trainer.predict_step(features).numpy()
    sharded = Trainer(run.model, build_optimizer("adam", LR), inference_shards=shards)
    np.testing.assert_allclose(sharded.predict_step(features).numpy(), whole,
                               rtol=1e-6, atol=1e-7)
    two_rows = {name: value[:2] for name, value in features.items()}
    np.testing.assert_allclose(sharded.predict_step(two_rows).numpy(), whole[:2],
                               rtol=1e-6, atol=1e-7)
    blocks = row_blocks(features, shards)
    assert [int(b["item_id"].shape[0]) for b in blocks] == [
        len(labels) // shards + (i < len(labels) % shards) for i in range(shards)]
    with pytest.raises(ValueError, match="inference_shards"):
        Trainer(run.model, build_optimizer("adam", LR), inference_shards=0)


def test_predict_logits_concatenates_batches(run, batch):
    features, labels = batch
    logits, got_labels = run.trainer.predict_logits([(features, labels), (features, labels)])
    single = run.trainer.predict_step(features).numpy()
    np.testing.assert_array_equal(logits, np.concatenate([single, single]))
    np.testing.assert_array_equal(got_labels, np.concatenate([labels.numpy()] * 2))
    logits, no_labels = run.trainer.predict_logits([(features, None)])
    assert no_labels is None and logits.shape == (len(labels),)
    empty_logits, empty_labels = run.trainer.predict_logits([])
    assert empty_logits.shape == (0,) and empty_labels.shape == (0,)
    with pytest.raises(ValueError, match="1 of 2 batches have labels"):
        run.trainer.predict_logits([(features, labels), (features, None)])


@pytest.fixture
def restore_jit():
    """``Trainer(xla=True)`` may switch on XLA for the whole process (auto-clustering)."""
    before = tf.config.optimizer.get_jit()
    try:
        yield
    finally:
        tf.config.optimizer.set_jit(before or False)


def test_xla_gives_the_same_losses_from_the_same_weights(run, schema, batch, restore_jit):
    features, labels = batch
    model = MODELS[run.kind](schema)
    trainer = Trainer(model, build_optimizer("adam", LR), xla=True)
    trainer.build(features)
    model.set_weights(run.initial)
    for step in range(3):
        losses = floats(trainer.train_step(features, labels))
        expected = floats(run.losses[step])
        for name in expected:
            assert losses[name] == pytest.approx(expected[name], abs=1e-5), (step, name)
    np.testing.assert_allclose(trainer.predict_step(features).numpy(),
                               run.predictions_after_three, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- options


def test_sparse_as_dense_densifies_the_embedding_gradients(schema):
    """With two alternating batches LazyAdam differs from Adam; densified gradients make LazyAdam
    plain Adam, so ``sparse_as_dense`` must reproduce Adam (to float rounding: our ``adam`` is
    one fused kernel, LazyAdam's dense path Keras's separate ops)."""
    batches = [make_batch(1), make_batch(2), make_batch(1)]
    tf.keras.utils.set_random_seed(5)
    reference = DINModel(schema, embedding_dim=4, short_length=2, mlp_dims=(8,))
    Trainer(reference, build_optimizer("adam", LR)).build(batches[0][0])
    initial = reference.get_weights()

    def train(optimizer, sparse_as_dense):
        model = DINModel(schema, embedding_dim=4, short_length=2, mlp_dims=(8,))
        trainer = Trainer(model, build_optimizer(optimizer, LR), sparse_as_dense=sparse_as_dense)
        trainer.build(batches[0][0])
        model.set_weights(initial)
        for features, labels in batches:
            trainer.train_step(features, labels)
        trainer.synchronize()  # deferred Adam rows (adam): every row up to date
        return model.get_weights()

    adam = train("adam", False)
    dense_lazy = train("lazy_adam", True)
    lazy = train("lazy_adam", False)
    for a, b in zip(adam, dense_lazy):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, b, rtol=1e-4) for a, b in zip(adam, lazy))


# ---------------------------------------------------------------- deferred Adam rows

needs_kernels = pytest.mark.skipif(not fused_adam.available(), reason="fused kernels not built")


def train_on_batches(kind, schema, batches, defer, monkeypatch, policy="float32"):
    """Train ``kind`` from seed 5 on ``batches`` with Adam, its tables' untouched rows deferred
    or not; the losses, then every model and optimizer variable after synchronize()."""
    with monkeypatch.context() as patch:
        if not defer:
            patch.setattr(Adam, "defer_untouched_rows", lambda self, variables: [])
        tf.keras.mixed_precision.set_global_policy(policy)
        try:
            tf.keras.utils.set_random_seed(5)
            trainer = Trainer(MODELS[kind](schema), build_optimizer("adam", LR))
            trainer.build(batches[0][0])
        finally:
            tf.keras.mixed_precision.set_global_policy("float32")
        losses = [floats(trainer.train_step(*b)) for b in batches]
        trainer.synchronize()
    state = [v.numpy() for v in trainer.model.variables + trainer.optimizer.variables]
    return trainer, losses, state


@needs_kernels
@pytest.mark.parametrize("kind, policy", [("sim", "float32"), ("din", "float32"),
                                          ("dien", "float32"), ("sim", "mixed_bfloat16")])
def test_deferred_adam_rows_train_the_bits_of_dense_adam(kind, policy, schema, monkeypatch):
    # Batches of different rows, so that most rows go untouched for some steps.
    batches = [make_batch(seed, size=8) for seed in range(10)]
    trainer, losses, state = train_on_batches(kind, schema, batches, True, monkeypatch, policy)
    tables = {v.name.split("/")[-2] for v in trainer.deferred_tables}
    assert tables == {"item_id_embeddings", "category_id_embeddings", "user_id_embeddings"}
    _, dense_losses, dense_state = train_on_batches(kind, schema, batches, False, monkeypatch,
                                                    policy)
    assert losses == dense_losses  # every step read up-to-date rows
    assert len(state) == len(dense_state)
    for mine, theirs in zip(state, dense_state):
        np.testing.assert_array_equal(mine, theirs)


@needs_kernels
@pytest.mark.parametrize("kind", ["din", "sim"])
def test_bfloat16_gradient_rows_of_a_large_table_train_the_same_bits(kind, monkeypatch):
    # An item table larger than MAX_SUMMED_ROWS: under mixed_bfloat16 its gradient rows go to
    # the deferred update as bfloat16 (the dtype they arrive in), which widens them exactly.
    import contextlib

    from sim_merlin.kernels.embedding_rows import MAX_SUMMED_ROWS
    from sim_merlin.training import trainer as trainer_module

    large = sample_schema({"item_id": MAX_SUMMED_ROWS + 100,
                           "category_id": CARDINALITY["category_id"]},
                          {"user_id": CARDINALITY["user_id"]}, HISTORY)
    batches = [make_batch(seed, size=8) for seed in range(4)]
    trainer, losses, state = train_on_batches(kind, large, batches, True, monkeypatch,
                                              "mixed_bfloat16")
    graph = trainer._gradients.get_concrete_function(*batches[0]).graph
    value_types = [op.get_attr("Tvalues") for op in graph.get_operations()
                   if op.type == "SimMerlinEmbeddingRowGroupsGrad"]
    assert [tf.bfloat16, tf.float32] in value_types  # the item table's rows, the categories'
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "bfloat16_gradient_rows",
                      lambda variables: contextlib.nullcontext())
        plain_trainer, plain_losses, plain_state = train_on_batches(
            kind, large, batches, True, monkeypatch, "mixed_bfloat16")
    graph = plain_trainer._gradients.get_concrete_function(*batches[0]).graph
    assert all(tf.bfloat16 not in op.get_attr("Tvalues") for op in graph.get_operations()
               if op.type == "SimMerlinEmbeddingRowGroupsGrad")
    assert losses == plain_losses
    for mine, theirs in zip(state, plain_state):
        np.testing.assert_array_equal(mine, theirs)


@needs_kernels
def test_deferred_rows_wait_until_read_and_predict_step_synchronizes(schema, batch,
                                                                     monkeypatch):
    batches = [make_batch(seed, size=8) for seed in range(4)]
    trainer, _, _ = train_on_batches("din", schema, batches, True, monkeypatch)
    _, _, dense_state = train_on_batches("din", schema, batches, False, monkeypatch)
    item_table = next(v for v in trainer.model.variables if "item_id_embeddings" in v.name)
    position = [v.name for v in trainer.model.variables].index(item_table.name)
    synchronized = item_table.numpy()
    np.testing.assert_array_equal(synchronized, dense_state[position])
    # One more step: rows it did not touch wait (stale) until predict_step brings them.
    features, labels = make_batch(99, size=2)
    trainer.train_step(features, labels)
    stale = item_table.numpy()
    trainer.predict_step(features)
    current = item_table.numpy()
    assert not np.array_equal(stale, current)
    read = np.unique(np.concatenate([np.ravel(features["item_id"]),
                                     np.ravel(features["item_id_history"])]))
    np.testing.assert_array_equal(stale[read], current[read])  # the batch's rows were current


@needs_kernels
def test_changing_the_learning_rate_while_rows_wait_is_refused(schema, monkeypatch):
    batches = [make_batch(seed, size=8) for seed in range(2)]
    trainer, _, _ = train_on_batches("din", schema, batches, True, monkeypatch)
    trainer.train_step(*batches[0])
    trainer.optimizer.learning_rate.assign(LR / 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="learning rate changed"):
        trainer.train_step(*batches[1])
    trainer.optimizer.learning_rate.assign(LR)
    trainer.synchronize()
    trainer.optimizer.learning_rate.assign(LR / 2)  # allowed once every row is up to date
    assert np.isfinite(trainer.train_step(*batches[1])["total_loss"].numpy())


@needs_kernels
def test_training_resumed_from_a_checkpoint_continues_dense_adam(schema, monkeypatch,
                                                                 tmp_path):
    """The per-row step counts are not checkpointed: after a restore they count from the
    restored step (a stale count would replay steps)."""
    batches = [make_batch(seed, size=8) for seed in range(8)]
    _, _, uninterrupted = train_on_batches("sim", schema, batches, True, monkeypatch)
    first, _, _ = train_on_batches("sim", schema, batches[:4], True, monkeypatch)
    prefix = tf.train.Checkpoint(model=first.model, optimizer=first.optimizer).save(
        str(tmp_path / "ckpt"))
    tf.keras.utils.set_random_seed(5)
    resumed = Trainer(MODELS["sim"](schema), build_optimizer("adam", LR))
    resumed.build(batches[0][0])
    resumed.train_step(*batches[0])  # step counts now 1: the restore must replace them
    resumed.synchronize()
    tf.train.Checkpoint(model=resumed.model, optimizer=resumed.optimizer).restore(prefix)
    assert int(resumed.optimizer.iterations.numpy()) == 4
    for b in batches[4:]:
        resumed.train_step(*b)
    resumed.synchronize()
    state = [v.numpy() for v in resumed.model.variables + resumed.optimizer.variables]
    for mine, theirs in zip(state, uninterrupted):
        np.testing.assert_array_equal(mine, theirs)


def test_trainer_rejects_a_model_without_loss_terms():
    model = SimpleNamespace(blocks=[tf.keras.layers.Dense(1)])
    with pytest.raises(TypeError, match="Dense has no loss_terms"):
        Trainer(model, build_optimizer("sgd"))


@pytest.fixture
def bfloat16_policy():
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_sim_train_step_under_mixed_bfloat16(runs, schema, batch, bfloat16_policy):
    features, labels = batch
    reference = runs["sim"]  # float32, built before the policy changed
    model = MODELS["sim"](schema)
    trainer = Trainer(model, build_optimizer("adam", LR))
    trainer.build(features)
    policies = {layer.dtype_policy.name for layer in model.submodules
                if isinstance(layer, tf.keras.layers.Layer)}
    assert "mixed_bfloat16" in policies
    assert not trainer.loss_scaling  # bfloat16 needs no loss scaling
    assert all(v.dtype == tf.float32 for v in model.trainable_variables)
    model.set_weights(reference.initial)
    losses = trainer.train_step(features, labels)
    for name, value in losses.items():
        assert value.dtype == tf.float32, name
        assert np.isfinite(float(value)), name
    # The float32 model's first losses from the same weights, to bfloat16's ~3 digits.
    for name, value in floats(losses).items():
        assert value == pytest.approx(float(reference.losses[0][name]), rel=1e-2), name
    after = [v.numpy() for v in model.trainable_variables]
    moved = [(a != b).any() for a, b in zip(after, reference.trainable)]
    assert sum(moved) > len(moved) // 2
    logits = trainer.predict_step(features)
    assert logits.dtype == tf.float32 and np.isfinite(logits.numpy()).all()


# ---------------------------------------------------------------- binary_cross_entropy


def test_binary_cross_entropy_matches_the_naive_formula():
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=4.0, size=1000)
    labels = rng.integers(0, 2, size=1000)
    assert binary_cross_entropy(labels, logits) == pytest.approx(numpy_bce(labels, logits),
                                                                 rel=1e-12)
    # float32 inputs and integer labels are fine; the result is a Python float.
    value = binary_cross_entropy(labels.astype(np.int8), logits.astype(np.float32))
    assert isinstance(value, float)
    assert value == pytest.approx(numpy_bce(labels, logits.astype(np.float32)), rel=1e-6)
    assert binary_cross_entropy([1, 0], [0.0, 0.0]) == pytest.approx(np.log(2), rel=1e-15)


def test_binary_cross_entropy_extreme_logits_do_not_overflow():
    logits = np.array([100.0, -100.0, 100.0, -100.0, 800.0, -800.0])
    labels = np.array([1, 1, 0, 0, 0, 1])
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # no inf, log(0) or NaN
        value = binary_cross_entropy(labels, logits)
    # Right answers: ~0 for a confident hit, |logit| for a confident miss.
    assert value == pytest.approx((0 + 100 + 100 + 0 + 800 + 800) / 6, rel=1e-12)
    assert binary_cross_entropy([1], [100.0]) == pytest.approx(np.exp(-100.0), rel=1e-9)
    assert binary_cross_entropy([0], [-100.0]) > 0
    assert np.isnan(binary_cross_entropy([], []))
    # Column and row vectors are the same samples; different counts are an error.
    assert binary_cross_entropy([[1], [0]], [0.0, 0.0]) == pytest.approx(np.log(2), rel=1e-15)
    with pytest.raises(ValueError, match="3 labels for 2 logits"):
        binary_cross_entropy([1, 0, 1], [0.0, 0.0])


# ---------------------------------------------------------------- precision_policy


@pytest.mark.parametrize("amp, device, dtype, policy", [
    (False, "cpu", "auto", "float32"),
    (False, "gpu", "auto", "float32"),
    (False, "gpu", "float16", "float32"),
    (True, "gpu", "auto", "mixed_float16"),
    (True, "cpu", "auto", "mixed_bfloat16"),
    (True, "cpu", "float16", "mixed_float16"),
    (True, "gpu", "bfloat16", "mixed_bfloat16"),
    (True, "gpu", "float16", "mixed_float16"),
])
def test_precision_policy(amp, device, dtype, policy):
    assert precision_policy(amp, device, dtype) == policy
    tf.keras.mixed_precision.Policy(policy)  # a policy Keras knows


def test_precision_policy_defaults_and_errors():
    assert precision_policy(False) == "float32"
    assert precision_policy(True) == "mixed_bfloat16"
    for dtype in ("float32", "fp16", "half"):
        with pytest.raises(ValueError, match="--amp_dtype"):
            precision_policy(True, "gpu", dtype)
