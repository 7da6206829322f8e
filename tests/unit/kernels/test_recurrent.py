"""The fused GRU / AUGRU ops against the TensorFlow loops (themselves checked against numpy in
tests/unit/blocks/test_interest.py): values and every gradient, masks, several row blocks."""
import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.blocks.interest import AUGRUCell, unrolled_augru, unrolled_gru
from sim_merlin.kernels import build, model_ops, recurrent

pytestmark = pytest.mark.compat_lock


def test_the_fused_kernels_build_and_load_here():
    # CI machines have g++: a missing kernel would silently test only the fallback.
    assert model_ops.available(), "the fused kernels did not build; see the message above"
    assert build.library_path().exists()


def _inputs(rows, steps, features, seed):
    rng = np.random.default_rng(seed)
    sequence = rng.normal(size=(rows, steps, features)).astype(np.float32)
    mask = rng.uniform(size=(rows, steps)) < 0.7
    mask[: rows // 3] = np.arange(steps) >= steps // 2  # left padding, as the data has
    mask[rows // 3: rows // 2] = True
    scores = rng.uniform(size=(rows, steps)).astype(np.float32)
    return tf.constant(sequence), tf.constant(mask), tf.constant(scores)


@pytest.mark.parametrize("rows", [5, 300])  # one partial block; two full blocks and a partial
@pytest.mark.parametrize("masked", [True, False])
def test_fused_gru_matches_the_loop_in_values_and_gradients(rows, masked):
    units, features = 6, 4
    sequence, mask, _ = _inputs(rows, 7, features, seed=rows)
    rng = np.random.default_rng(1)
    kernel = tf.Variable(rng.normal(size=(features, 3 * units)).astype(np.float32))
    recurrent_kernel = tf.Variable(rng.normal(size=(units, 3 * units)).astype(np.float32))
    bias = tf.Variable(rng.normal(size=(2, 3 * units)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(rows, 7, units)).astype(np.float32))
    results = []
    for fused in (False, True):
        with tf.GradientTape() as tape:
            tape.watch(sequence)
            states = unrolled_gru(sequence, mask if masked else None, kernel, recurrent_kernel,
                                  bias, fused=fused)
            loss = tf.reduce_sum(states * weights)
        results.append([states, *tape.gradient(loss, [sequence, kernel, recurrent_kernel, bias])])
    for name, loop, fused in zip(["states", "d sequence", "d kernel", "d recurrent", "d bias"],
                                 *results):
        np.testing.assert_allclose(fused.numpy(), loop.numpy(), rtol=2e-4, atol=2e-5,
                                   err_msg=name)
    if masked:  # a padded step carries the state over
        states = results[1][0].numpy()
        assert (states[: rows // 3, : 7 // 2] == 0).all()


@pytest.mark.parametrize("rows", [5, 300])
@pytest.mark.parametrize("masked", [True, False])
def test_fused_augru_matches_the_loop_in_values_and_gradients(rows, masked):
    units, features = 5, 4
    sequence, mask, scores = _inputs(rows, 6, features, seed=rows + 1)
    cell = AUGRUCell(units)
    cell.build([None, features + 1])
    rng = np.random.default_rng(2)
    for w in cell.trainable_weights:
        w.assign(rng.normal(size=w.shape).astype(np.float32))
    weights = tf.constant(rng.normal(size=(rows, units)).astype(np.float32))
    results = []
    for fused in (False, True):
        with tf.GradientTape() as tape:
            tape.watch([sequence, scores])
            final = unrolled_augru(sequence, scores, mask if masked else None, cell, fused=fused)
            loss = tf.reduce_sum(final * weights)
        results.append([final, *tape.gradient(loss, [sequence, scores, *cell.trainable_weights])])
    names = ["final", "d sequence", "d scores"] + [w.name for w in cell.trainable_weights]
    for name, loop, fused in zip(names, *results):
        np.testing.assert_allclose(fused.numpy(), loop.numpy(), rtol=2e-4, atol=2e-5,
                                   err_msg=name)


def test_fused_ops_keep_bfloat16_in_and_out_and_agree_with_float32():
    sequence, mask, scores = _inputs(9, 5, 4, seed=3)
    cell = AUGRUCell(4)
    cell.build([None, 5])
    low = unrolled_augru(tf.cast(sequence, tf.bfloat16), tf.cast(scores, tf.bfloat16), mask, cell,
                         fused=True)
    assert low.dtype == tf.bfloat16
    full = unrolled_augru(sequence, scores, mask, cell, fused=False)
    np.testing.assert_allclose(tf.cast(low, tf.float32).numpy(), full.numpy(), atol=3e-2)


def _bits(tensor):
    return tf.bitcast(tensor, tf.uint16).numpy() if tensor.dtype == tf.bfloat16 else tensor.numpy()


def test_bfloat16_rows_are_converted_inside_the_kernels_as_a_cast_would():
    """bfloat16 sequences, states and their gradients go in and out of the ops as they are
    (no Cast op over them); inside, each block is widened exactly and the results rounded to
    the nearest even bfloat16: bit for bit what casting around the float32 op gives."""
    lib = build.load()
    rng = np.random.default_rng(8)
    rows, steps, u, f = 301, 7, 6, 5  # several blocks; lengths that are not multiples of 16
    low = lambda shape: tf.cast(rng.normal(size=shape).astype(np.float32), tf.bfloat16)  # noqa
    f32 = lambda t: tf.cast(t, tf.float32)  # noqa: E731
    x, states, states_grad = low((rows, steps, f)), low((rows, steps, u)), low((rows, steps, u))
    W, U, Wg, Wc = (tf.constant(rng.normal(size=s).astype(np.float32) * 0.3)
                    for s in [(f, 3 * u), (u, 3 * u), (u, 2 * u), (u, u)])
    b, bx = (tf.constant(rng.normal(size=(3 * u,)).astype(np.float32)) for _ in range(2))
    mask = tf.constant((rng.uniform(size=(rows, steps)) < 0.8).astype(np.float32))
    scores = tf.constant(rng.uniform(size=(rows, steps)).astype(np.float32))
    final_grad = tf.constant(rng.normal(size=(rows, u)).astype(np.float32))
    options = dict(bf16_products=True, threads=1)
    pairs = [
        (lib.sim_merlin_gru(x, W, bx, U, b, mask, **options),
         lib.sim_merlin_gru(f32(x), W, bx, U, b, mask, **options)),
        (lib.sim_merlin_gru_grad(x, W, bx, U, b, mask, states, states_grad, tf.zeros([0]),
                                 **options),
         lib.sim_merlin_gru_grad(f32(x), W, bx, U, b, mask, f32(states), f32(states_grad),
                                 tf.zeros([0]), **options)),
        (lib.sim_merlin_augru(x, W, bx, Wg, Wc, scores, mask, **options),
         lib.sim_merlin_augru(f32(x), W, bx, Wg, Wc, scores, mask, **options)),
        (lib.sim_merlin_augru_grad(x, W, bx, Wg, Wc, scores, mask, final_grad, tf.zeros([0]),
                                   **options),
         lib.sim_merlin_augru_grad(f32(x), W, bx, Wg, Wc, scores, mask, final_grad,
                                   tf.zeros([0]), **options)),
    ]
    for low_out, full_out in pairs:
        for got, want in zip(tf.nest.flatten(low_out), tf.nest.flatten(full_out)):
            want = tf.cast(want, got.dtype)  # bfloat16 where the op's T is
            np.testing.assert_array_equal(_bits(got), _bits(want))
    assert pairs[0][0][0].dtype == tf.bfloat16 and pairs[1][0][0].dtype == tf.bfloat16
    traced = tf.function(lambda x: unrolled_gru(x, None, tf.zeros([3, 18]), U, tf.zeros([2, 18]),
                                                fused=True))
    graph = traced.get_concrete_function(tf.TensorSpec([None, 4, 3], tf.bfloat16)).graph
    (op,) = [op for op in graph.get_operations() if op.type == "SimMerlinGru"]
    assert op.get_attr("T") == tf.bfloat16 and op.inputs[0].op.type != "Cast"


@pytest.mark.parametrize("bf16", [False, True])
def test_kept_augru_activations_give_the_recomputed_gradients_bit_for_bit(bf16):
    """keep_activations: the forward op hands its activations to the gradient op, which then
    skips the forward pass. The final state and every gradient are the same bits as when the
    gradient recomputes them; the kept tensor is each block's states (zeros first), reset and
    update gates and candidates, (4T + 1) u floats per row, and its states are the loop's."""
    lib = build.load()
    rng = np.random.default_rng(11)
    rows, steps, u, f = 300, 6, 5, 4  # two full blocks of 128 and a partial one
    sequence, mask, scores = _inputs(rows, steps, f, seed=12)
    x = tf.cast(sequence, tf.bfloat16 if bf16 else tf.float32)
    mask = tf.cast(mask, tf.float32)
    W, Wg, Wc = (tf.constant(rng.normal(size=s).astype(np.float32) * 0.4)
                 for s in [(f, 3 * u), (u, 2 * u), (u, u)])
    bx = tf.constant(rng.normal(size=(3 * u,)).astype(np.float32))
    final_grad = tf.constant(rng.normal(size=(rows, u)).astype(np.float32))
    options = dict(bf16_products=bf16, threads=1)
    final, none_kept = lib.sim_merlin_augru(x, W, bx, Wg, Wc, scores, mask, **options)
    kept_final, kept = lib.sim_merlin_augru(x, W, bx, Wg, Wc, scores, mask,
                                            keep_activations=True, **options)
    assert none_kept.shape == (0,) and kept.shape == (rows * (4 * steps + 1) * u,)
    np.testing.assert_array_equal(kept_final.numpy(), final.numpy())
    recomputed = lib.sim_merlin_augru_grad(x, W, bx, Wg, Wc, scores, mask, final_grad,
                                           none_kept, **options)
    from_kept = lib.sim_merlin_augru_grad(x, W, bx, Wg, Wc, scores, mask, final_grad, kept,
                                          **options)
    for name, want, got in zip(["d sequence", "d kernel", "d bias", "d gate kernel",
                                "d candidate kernel", "d scores"], recomputed, from_kept):
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=name)
    # The layout: block k (rows 128 k..) holds its states [(T + 1) n, u] step-major first; the
    # state after the last step is the final state.
    kept = kept.numpy()
    begin, n = 256, rows - 256  # the partial block
    block = kept[begin * (4 * steps + 1) * u:]
    states = block[: (steps + 1) * n * u].reshape(steps + 1, n, u)
    assert (states[0] == 0).all()
    np.testing.assert_array_equal(states[steps], final.numpy()[begin:])
    with pytest.raises(tf.errors.InvalidArgumentError, match="activations must be empty"):
        lib.sim_merlin_augru_grad(x, W, bx, Wg, Wc, scores, mask, final_grad, kept[:-1],
                                  **options)


@pytest.mark.parametrize("bf16", [False, True])
def test_kept_gru_activations_give_the_recomputed_gradients_bit_for_bit(bf16):
    """The GRU's keep_activations: its gates and candidates (4u floats per row and step) go to
    the gradient op, which then skips the forward products; the same bits as recomputing."""
    lib = build.load()
    rng = np.random.default_rng(14)
    rows, steps, u, f = 300, 6, 5, 4
    sequence, mask, _ = _inputs(rows, steps, f, seed=15)
    x = tf.cast(sequence, tf.bfloat16 if bf16 else tf.float32)
    mask = tf.cast(mask, tf.float32)
    W, U = (tf.constant(rng.normal(size=s).astype(np.float32) * 0.4)
            for s in [(f, 3 * u), (u, 3 * u)])
    bx, b = (tf.constant(rng.normal(size=(3 * u,)).astype(np.float32)) for _ in range(2))
    states_grad = tf.cast(tf.constant(rng.normal(size=(rows, steps, u)).astype(np.float32)),
                          x.dtype)
    options = dict(bf16_products=bf16, threads=1)
    states, none_kept = lib.sim_merlin_gru(x, W, bx, U, b, mask, **options)
    kept_states, kept = lib.sim_merlin_gru(x, W, bx, U, b, mask, keep_activations=True,
                                           **options)
    assert none_kept.shape == (0,) and kept.shape == (rows * steps * 4 * u,)
    np.testing.assert_array_equal(_bits(kept_states), _bits(states))
    recomputed = lib.sim_merlin_gru_grad(x, W, bx, U, b, mask, states, states_grad, none_kept,
                                         **options)
    from_kept = lib.sim_merlin_gru_grad(x, W, bx, U, b, mask, states, states_grad, kept,
                                        **options)
    for name, want, got in zip(["d sequence", "d kernel", "d input bias", "d recurrent kernel",
                                "d recurrent bias"], recomputed, from_kept):
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=name)
    # step 0 of the first block: z, r are sigmoids of x_0 W + b_x + b (the state is zero)
    first = kept.numpy()[: 128 * 4 * u].reshape(128, 4 * u)
    x0 = tf.cast(x, tf.float32).numpy()[:128, 0]
    z_r = 1 / (1 + np.exp(-(x0 @ W.numpy() + bx.numpy() + b.numpy())[:, : 2 * u]))
    np.testing.assert_allclose(first[:, : 2 * u], z_r, rtol=2e-2 if bf16 else 1e-5, atol=1e-2
                               if bf16 else 1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="activations must be empty"):
        lib.sim_merlin_gru_grad(x, W, bx, U, b, mask, states, states_grad, kept[1:], **options)


def test_training_steps_keep_recurrent_activations_as_configured(monkeypatch):
    """The interest blocks ask the GRU and AUGRU ops to keep their activations in training steps
    only, where training_keeps_activations() says so (SIM_MERLIN_KEEP_ACTIVATIONS, else: no
    AMX)."""
    from sim_merlin.blocks.interest import InterestEvolution, InterestExtractor

    evolution, extractor = InterestEvolution(4), InterestExtractor(4)
    sequence, mask, _ = _inputs(3, 5, 4, seed=13)
    query = tf.random.normal([3, 4])

    def kept(training):
        def step(q, s):
            return evolution(q, extractor(s, mask, training=training), mask, training=training)

        graph = tf.function(step).get_concrete_function(query, sequence).graph
        ops = [op for op in graph.get_operations() if op.type in ("SimMerlinGru",
                                                                   "SimMerlinAugru")]
        assert sorted(op.type for op in ops) == ["SimMerlinAugru", "SimMerlinGru"]
        return [op.get_attr("keep_activations") for op in ops]

    monkeypatch.setenv("SIM_MERLIN_KEEP_ACTIVATIONS", "1")
    assert recurrent.training_keeps_activations()
    assert kept(True) == [True, True] and kept(False) == [False, False]
    monkeypatch.setenv("SIM_MERLIN_KEEP_ACTIVATIONS", "0")
    assert kept(True) == [False, False]
    monkeypatch.delenv("SIM_MERLIN_KEEP_ACTIVATIONS")
    monkeypatch.setenv("SIM_MERLIN_KERNEL_AMX", "0")  # products on AVX512-BF16: keep
    assert recurrent.training_keeps_activations() and not recurrent.amx_products()


def test_bad_shapes_are_named():
    gru_weights = [tf.zeros([4, 6]), tf.zeros([6]), tf.zeros([2, 6]), tf.zeros([6])]
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask must be"):
        recurrent.gru(tf.zeros([2, 3, 4]), *gru_weights, tf.ones([2, 4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"kernel must be \[features, 6\]"):
        recurrent.gru(tf.zeros([2, 3, 5]), *gru_weights, tf.ones([2, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="gate_kernel must be"):
        recurrent.augru(tf.zeros([2, 3, 4]), tf.zeros([4, 6]), tf.zeros([6]), tf.zeros([2, 3]),
                        tf.zeros([2, 2]), tf.ones([2, 3]), tf.ones([2, 3]))


def test_saved_models_never_contain_the_fused_ops(tmp_path):
    cell = AUGRUCell(3)
    cell.build([None, 4])

    class Evolve(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4, 3]), tf.TensorSpec([None, 4])])
        def __call__(self, sequence, scores):
            return unrolled_augru(sequence, scores, None, cell)

    module = Evolve()
    module.cell = cell
    sequence = tf.random.normal([2, 4, 3])
    scores = tf.random.uniform([2, 4])
    eager_graph = module.__call__.get_concrete_function().graph.as_graph_def()
    assert any(node.op == "SimMerlinAugru" for node in eager_graph.node)
    tf.saved_model.save(module, str(tmp_path))
    saved = (tmp_path / "saved_model.pb").read_bytes()
    assert b"SimMerlinAugru" not in saved
    loaded = tf.saved_model.load(str(tmp_path))
    np.testing.assert_allclose(loaded(sequence, scores).numpy(), module(sequence, scores).numpy(),
                               rtol=1e-5, atol=1e-6)


THREADS_SCRIPT = r"""
rng = np.random.default_rng(0)
B, T, u, F = 700, 6, 8, 5  # 6 row blocks, the last one partial
x = tf.constant(rng.normal(size=(B, T, F)).astype(np.float32))
W = tf.constant(rng.normal(size=(F, 3 * u)).astype(np.float32) * 0.3)
bx = tf.constant(rng.normal(size=(3 * u,)).astype(np.float32))
mask = tf.constant((rng.uniform(size=(B, T)) < 0.8).astype(np.float32))
a = tf.constant(rng.uniform(size=(B, T)).astype(np.float32))
U = tf.constant(rng.normal(size=(u, 3 * u)).astype(np.float32) * 0.3)
b = tf.constant(rng.normal(size=(3 * u,)).astype(np.float32))
Wg = tf.constant(rng.normal(size=(u, 2 * u)).astype(np.float32) * 0.3)
Wc = tf.constant(rng.normal(size=(u, u)).astype(np.float32) * 0.3)
out = {}
for threads in (1, 3):
    for bf16 in (False, True):
        options = dict(bf16_products=bf16, threads=threads)
        states, gru_kept = lib.sim_merlin_gru(x, W, bx, U, b, mask, keep_activations=True,
                                              **options)
        grads = lib.sim_merlin_gru_grad(x, W, bx, U, b, mask, states, states, gru_kept, **options)
        final, kept = lib.sim_merlin_augru(x, W, bx, Wg, Wc, a, mask, keep_activations=True,
                                           **options)
        agrads = lib.sim_merlin_augru_grad(x, W, bx, Wg, Wc, a, mask, final, kept, **options)
        out[threads, bf16] = [t.numpy() for t in (states, gru_kept, *grads, final, kept, *agrads)]
for bf16 in (False, True):
    for x, y in zip(out[1, bf16], out[3, bf16]):
        assert np.array_equal(x, y), "results depend on the number of threads"
print("identical")
"""


def test_kernels_on_their_own_threads_give_the_same_bits_as_on_one(run_with_one_intra_op_thread):
    """With a one-thread intra-op pool the kernels split their row blocks over threads of their
    own; the weight gradients are summed in block order, so --deterministic holds."""
    assert "identical" in run_with_one_intra_op_thread(THREADS_SCRIPT)


def test_functions_traced_under_plain_ops_hold_no_custom_op():
    """XLA's jit_compile cannot compile custom ops: the trainer traces its jit-compiled
    prediction step under plain_ops()."""
    sequence, mask, _ = _inputs(4, 3, 2, seed=5)
    weights = [tf.zeros([2, 9]), tf.zeros([3, 9]), tf.zeros([2, 9])]
    fused = tf.function(lambda s: unrolled_gru(s, mask, *weights)).get_concrete_function(sequence)
    with model_ops.plain_ops():
        plain = tf.function(lambda s: unrolled_gru(s, mask, *weights)).get_concrete_function(
            sequence)
    assert model_ops.available()  # restored on leaving the block
    assert "SimMerlinGru" in {op.type for op in fused.graph.get_operations()}
    assert "SimMerlinGru" not in {op.type for op in plain.graph.get_operations()}
