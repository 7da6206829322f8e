"""The fused sigmoid MLP against numpy (values and every gradient, float32 and bfloat16 products,
plain, and with group inputs shared by consecutive rows and DIN's product term), and the blocks
that use it (auxiliary loss, DIEN's attention unit) against their plain paths."""
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.blocks.attention import TargetAttention
from sim_merlin.blocks.interest import AuxiliaryLoss
from sim_merlin.kernels import model_ops
from sim_merlin.kernels.build import load
from sim_merlin.kernels.sigmoid_mlp import sigmoid_mlp, sigmoid_mlp_logistic_loss

pytestmark = pytest.mark.compat_lock

HAS_BF16_PRODUCTS = "avx512_bf16" in Path("/proc/cpuinfo").read_text()


def _bf16(x):
    """float32 -> nearest bfloat16 (ties to even), back in float32, as the kernels round."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_mlp(problem, bf16):
    """Forward and backward in float64. ``problem``: x, groups, group kernel, product kernel
    (or None), kernels, biases, outputs' gradient. With ``bf16`` the hidden layers' product
    operands are rounded to bfloat16 first (the output layer's are not)."""
    x, g, w_g, w_p, kernels, biases, dout = problem
    repeat, last = len(x) // max(len(g), 1), len(kernels) - 1
    rnd = lambda a, i: _bf16(a) if bf16 and i < last else np.asarray(a, np.float64)  # noqa: E731
    g_rows = np.repeat(g.astype(np.float64), repeat, axis=0)
    group_sums = lambda a: a.reshape(len(g), repeat, -1).sum(axis=1)  # noqa: E731
    products = x * g_rows if w_p is not None else None
    z = rnd(x, 0) @ rnd(kernels[0], 0) + np.repeat(rnd(g, 0) @ rnd(w_g, 0), repeat, axis=0)
    if w_p is not None:
        z = z + rnd(products, 0) @ rnd(w_p, 0)
    z = z + biases[0]
    layer_inputs, activations = [x], []
    for i in range(1, len(kernels)):
        activations.append(_sigmoid(z))
        layer_inputs.append(activations[-1])
        z = rnd(activations[-1], i) @ rnd(kernels[i], i) + biases[i]
    out, d = z, dout.astype(np.float64)
    kernel_grads, bias_grads = [None] * len(kernels), [None] * len(kernels)
    for i in range(last, 0, -1):
        kernel_grads[i] = rnd(layer_inputs[i], i).T @ rnd(d, i)
        bias_grads[i] = d.sum(axis=0)
        d = (rnd(d, i) @ rnd(kernels[i], i).T) * activations[i - 1] * (1 - activations[i - 1])
    sums = group_sums(d)
    kernel_grads[0] = rnd(x, 0).T @ rnd(d, 0)
    bias_grads[0] = d.sum(axis=0)
    d_x = rnd(d, 0) @ rnd(kernels[0], 0).T
    d_g = rnd(sums, 0) @ rnd(w_g, 0).T
    d_wg = rnd(g, 0).T @ rnd(sums, 0)
    d_wp = None
    if w_p is not None:
        d_products = rnd(d, 0) @ rnd(w_p, 0).T
        d_x = d_x + d_products * g_rows
        d_g = d_g + group_sums(d_products * x)
        d_wp = rnd(products, 0).T @ rnd(d, 0)
    return out, d_x, d_g, d_wg, d_wp, kernel_grads, bias_grads


def _problem(rows, widths, seed, repeat=None, group_width=0, product=False):
    """x [rows, widths[0]] and layers of widths[1:]; with ``repeat``, groups [rows / repeat,
    group_width] and their kernel (and the product kernel)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    x = normal(rows, widths[0])
    kernels = [(normal(a, b) / np.sqrt(a)).astype(np.float32) for a, b in zip(widths, widths[1:])]
    biases = [normal(b) for b in widths[1:]]
    dout = normal(rows, widths[-1])
    groups = rows // (repeat or 1)
    g = normal(groups, group_width)
    w_g = (normal(group_width, widths[1]) / np.sqrt(max(group_width, 1))).astype(np.float32)
    w_p = (normal(widths[0], widths[1]) / np.sqrt(widths[0])).astype(np.float32) if product else None
    return [x, g, w_g, w_p, kernels, biases, dout]


def _fused(problem, dtype, with_groups=True):
    """The op's value and gradients through sigmoid_mlp (and the tape), as numpy arrays in the
    order of :func:`_numpy_mlp` (None for an absent product kernel)."""
    x, g, w_g, w_p, kernels, biases, dout = problem
    inputs = [tf.constant(x), tf.constant(g)]
    variables = [tf.Variable(t) for t in [w_g, *kernels, *biases]]
    product = [tf.Variable(w_p)] if w_p is not None else []
    layers = len(kernels)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        options = {}
        if with_groups:
            options = dict(groups=tf.cast(inputs[1], dtype), group_kernel=variables[0],
                           product_kernel=product[0] if product else None)
        out = sigmoid_mlp(tf.cast(inputs[0], dtype), variables[1:1 + layers],
                          variables[1 + layers:], **options)
        loss = tf.reduce_sum(out * dout)
    grads = tape.gradient(loss, inputs + variables + product)
    grads = [None if t is None else t.numpy() for t in grads]
    d_wp = grads[-1] if product else None
    return (out.numpy(), grads[0], grads[1], grads[2], d_wp, grads[3:3 + layers],
            grads[3 + layers:3 + 2 * layers])


def _compare(got, want, tolerance, names=("outputs", "d inputs", "d groups", "d group kernel",
                                         "d product kernel")):
    for name, a, b in zip(names, got[:5], want[:5]):
        if b is None or b.size == 0:
            continue
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, err_msg=name, **tolerance[name])
    for i, (a, b) in enumerate(zip(got[5] + got[6], want[5] + want[6])):
        np.testing.assert_allclose(a, b, err_msg=f"weights {i}", **tolerance["weights"])


FLOAT32 = {name: dict(rtol=1e-4, atol=1e-5) for name in
           ("outputs", "d inputs", "d groups", "d group kernel", "d product kernel")}
FLOAT32["weights"] = dict(rtol=1e-4, atol=1e-4)


def test_the_fused_mlp_is_in_the_library():
    assert model_ops.available(), "the fused kernels did not build; see the message above"
    assert hasattr(load(), "sim_merlin_sigmoid_mlp")


@pytest.mark.parametrize("rows", [5, 700])  # one partial block; two full blocks and a partial
@pytest.mark.parametrize("widths", [(32, 100, 50, 1), (7, 5, 3, 2), (9, 1)])
def test_float32_values_and_gradients_match_numpy(rows, widths):
    problem = _problem(rows, widths, seed=rows + len(widths))
    got = _fused(problem, tf.float32, with_groups=False)
    assert got[0].dtype == np.float32 and got[0].shape == (rows, widths[-1])
    _compare(got, _numpy_mlp(problem, bf16=False), FLOAT32)


# repeat 2: the auxiliary tower's pairs; 10: the attention unit's steps; 7 does not divide the
# 256 rows of a block (blocks of 252 rows): 2,100 rows are 9 blocks, one partial.
@pytest.mark.parametrize("groups,repeat", [(1, 1), (300, 2), (90, 10), (300, 7)])
@pytest.mark.parametrize("product", [False, True])
def test_group_inputs_and_the_product_term_match_numpy(groups, repeat, product):
    problem = _problem(groups * repeat, (6, 9, 5, 1), seed=groups + repeat, repeat=repeat,
                       group_width=6 if product else 4, product=product)
    got = _fused(problem, tf.float32)
    _compare(got, _numpy_mlp(problem, bf16=False), FLOAT32)


@pytest.mark.parametrize("widths,repeat,product", [((32, 100, 50, 1), 2, False),
                                                   ((24, 80, 40, 1), 10, True),
                                                   ((7, 5, 3, 2), 1, False)])
def test_bfloat16_inputs_round_the_hidden_products_operands(widths, repeat, product):
    """bfloat16 inputs select bfloat16 products with float32 sums for the hidden layers (as
    oneDNN's under mixed_bfloat16), where the CPU has them; the result is float32."""
    problem = _problem(600, widths, seed=3, repeat=repeat, group_width=widths[0], product=product)
    problem[0], problem[1] = _bf16(problem[0]), _bf16(problem[1])  # what bfloat16 tensors hold
    got = _fused(problem, tf.bfloat16)
    assert got[0].dtype == np.float32
    rounded, exact = _numpy_mlp(problem, bf16=True), _numpy_mlp(problem, bf16=False)
    want = rounded if HAS_BF16_PRODUCTS else exact
    tolerance = {name: dict(rtol=2e-2, atol=3e-3) for name in FLOAT32}  # bfloat16 gradients
    tolerance["outputs"] = dict(rtol=1e-3, atol=1e-3)
    tolerance["weights"] = dict(rtol=1e-2, atol=1e-2)
    _compare(got, want, tolerance)
    if HAS_BF16_PRODUCTS:  # closer to the rounded arithmetic than to the exact one
        error = lambda reference: np.abs(got[0] - reference[0]).mean()  # noqa: E731
        assert error(rounded) < error(exact) / 4


def test_bfloat16_inputs_are_converted_inside_as_a_cast_would():
    """No Cast op over the inputs or their gradients: bit for bit what casting around the
    float32 op gives."""
    lib = load()
    x, g, w_g, w_p, kernels, biases, dout = _problem(602, (6, 37, 5, 1), seed=9, repeat=2,
                                                     group_width=6, product=True)
    low = [tf.cast(t, tf.bfloat16) for t in (x, g)]
    as_float = [tf.cast(t, tf.float32) for t in low]
    options = dict(bf16_products=True, threads=1)
    outputs = [lib.sim_merlin_sigmoid_mlp(*xs, w_g, w_p, kernels, biases, **options)
               for xs in (low, as_float)]
    np.testing.assert_array_equal(outputs[0].numpy(), outputs[1].numpy())
    grads = [lib.sim_merlin_sigmoid_mlp_grad(*xs, w_g, w_p, kernels, biases, dout, **options)
             for xs in (low, as_float)]
    for i in (0, 1):  # the inputs' and the groups' gradients
        assert grads[0][i].dtype == tf.bfloat16
        np.testing.assert_array_equal(
            tf.bitcast(grads[0][i], tf.uint16).numpy(),
            tf.bitcast(tf.cast(grads[1][i], tf.bfloat16), tf.uint16).numpy())
    for got, want in zip([*grads[0][2:4], *grads[0][4], *grads[0][5]],
                         [*grads[1][2:4], *grads[1][4], *grads[1][5]]):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_no_rows_gives_empty_outputs_and_zero_weight_gradients():
    problem = _problem(0, (3, 4, 1), seed=0, repeat=2, group_width=3, product=True)
    got = _fused(problem, tf.float32)
    assert got[0].shape == (0, 1) and got[1].shape == (0, 3) and got[2].shape == (0, 3)
    assert all(not g.any() for g in [got[3], got[4], *got[5], *got[6]])


def test_mismatched_weights_and_rows_are_named():
    x = tf.zeros([6, 4])
    two = lambda k: ([tf.zeros([4, 5]), k], [tf.zeros([5]), tf.zeros([1])])  # noqa: E731
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"kernels\[1\] must be \[5, units\]"):
        sigmoid_mlp(x, *two(tf.zeros([6, 1])))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"biases\[0\] must have 5 elements"):
        sigmoid_mlp(x, [tf.zeros([4, 5]), tf.zeros([5, 1])], [tf.zeros([4]), tf.zeros([1])])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"whole number of groups"):
        sigmoid_mlp(x, *two(tf.zeros([5, 1])), groups=tf.zeros([4, 4]),
                    group_kernel=tf.zeros([4, 5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"group_kernel must be \[3, 5\]"):
        sigmoid_mlp(x, *two(tf.zeros([5, 1])), groups=tf.zeros([3, 3]),
                    group_kernel=tf.zeros([4, 5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"product_kernel must be \[0, 5\]"):
        sigmoid_mlp(x, *two(tf.zeros([5, 1])), groups=tf.zeros([3, 3]),
                    group_kernel=tf.zeros([3, 5]), product_kernel=tf.zeros([4, 5]))
    with pytest.raises(ValueError, match="as many biases as kernels"):
        sigmoid_mlp(x, [tf.zeros([4, 1])], [])
    with pytest.raises(ValueError, match="need groups"):
        sigmoid_mlp(x, *two(tf.zeros([5, 1])), group_kernel=tf.zeros([3, 5]))



def _numpy_logistic_loss(z, labels, weights, epsilon):
    """The weighted loss and its gradient dz in float64 (the op's definition)."""
    z = z[:, 0].astype(np.float64)
    s = _sigmoid(z)
    if epsilon > 0:
        with np.errstate(divide="ignore", invalid="ignore"):  # a term is only used where y says
            positive = np.where(labels != 0, -np.log(s + epsilon), 0.0)
            negative = np.where(labels != 1, -np.log(1 - s - epsilon), 0.0)
            slope = s * (1 - s)
            d_positive = np.where(labels != 0, -slope / (s + epsilon), 0.0)
            d_negative = np.where(labels != 1, slope / (1 - s - epsilon), 0.0)
        loss = labels * positive + (1 - labels) * negative
        dz = labels * d_positive + (1 - labels) * d_negative
    else:
        softplus = lambda v: np.logaddexp(0.0, v)  # noqa: E731
        loss = labels * softplus(-z) + (1 - labels) * softplus(z)
        dz = s - labels
    return (weights * loss).sum(), (weights * dz)[:, None]


def _loss_problem(epsilon, rows=700, seed=11, labels=None):
    problem = _problem(rows, (32, 100, 50, 1), seed=seed, repeat=2, group_width=12)
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = np.tile(np.array([1.0, 0.0], np.float32), rows // 2)  # (positive, negative) pairs
    weights = (rng.uniform(size=rows) * (rng.uniform(size=rows) < 0.8)).astype(np.float32)
    return problem, labels.astype(np.float32), weights


def _fused_loss(problem, labels, weights, epsilon, dtype=tf.float32, scale=1.0):
    """The loss op's value and gradients (through the tape, times ``scale``)."""
    x, g, w_g, _, kernels, biases, _ = problem
    inputs = [tf.constant(x), tf.constant(g)]
    variables = [tf.Variable(t) for t in [w_g, *kernels, *biases]]
    layers = len(kernels)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = sigmoid_mlp_logistic_loss(
            tf.cast(inputs[0], dtype), variables[1:1 + layers], variables[1 + layers:], labels,
            weights, groups=tf.cast(inputs[1], dtype), group_kernel=variables[0],
            epsilon=epsilon)
        scaled = loss * scale
    grads = [t.numpy() for t in tape.gradient(scaled, inputs + variables)]
    return (loss.numpy(), grads[0], grads[1], grads[2], None, grads[3:3 + layers],
            grads[3 + layers:3 + 2 * layers])


@pytest.mark.parametrize("epsilon", [0.0, 1e-6])
@pytest.mark.parametrize("scale", [1.0, -2.5])  # the incoming gradient 1 is passed unscaled
def test_logistic_loss_op_matches_numpy(epsilon, scale):
    """The loss op: sum_n w_n l(z_n, y_n) of the MLP's logits, and its gradients (those of the
    MLP for dz = w dl/dz), against float64 numpy; the incoming gradient scales them."""
    problem, labels, weights = _loss_problem(epsilon)
    x, g, w_g, _, kernels, biases, _ = problem
    z = _numpy_mlp(problem, bf16=False)[0]
    want_loss, dz = _numpy_logistic_loss(z, labels, weights, epsilon)
    want = _numpy_mlp([x, g, w_g, None, kernels, biases, dz * scale], bf16=False)
    got = _fused_loss(problem, labels, weights, epsilon, scale=scale)
    assert got[0].shape == () and got[0].dtype == np.float32
    np.testing.assert_allclose(got[0], want_loss, rtol=1e-5)
    _compare((None, *got[1:]), (None, *want[1:]), FLOAT32)
    # the same gradients as the MLP op's given dz: only the loss differs between the paths
    plain = _fused([x, g, w_g, None, kernels, biases, (dz * scale).astype(np.float32)],
                   tf.float32)
    _compare((None, *got[1:]), (None, *plain[1:]), FLOAT32)


def test_logistic_loss_op_takes_fractional_labels_and_bfloat16_inputs():
    rng = np.random.default_rng(12)
    labels = rng.uniform(size=600).astype(np.float32)  # soft labels: y l(+) + (1 - y) l(-)
    problem, labels, weights = _loss_problem(0.0, rows=600, seed=12, labels=labels)
    problem[0], problem[1] = _bf16(problem[0]), _bf16(problem[1])
    z = _numpy_mlp(problem, bf16=HAS_BF16_PRODUCTS)[0]
    want_loss, dz = _numpy_logistic_loss(z, labels, weights, 0.0)
    x, g, w_g, _, kernels, biases, _ = problem
    want = _numpy_mlp([x, g, w_g, None, kernels, biases, dz], bf16=HAS_BF16_PRODUCTS)
    got = _fused_loss(problem, labels, weights, 0.0, dtype=tf.bfloat16)
    np.testing.assert_allclose(got[0], want_loss, rtol=1e-3)
    tolerance = {name: dict(rtol=2e-2, atol=3e-3) for name in FLOAT32}
    tolerance["weights"] = dict(rtol=1e-2, atol=1e-2)
    _compare((None, *got[1:]), (None, *want[1:]), tolerance)


def test_logistic_loss_op_stays_finite_when_saturated():
    """Logits of +-80. The logistic loss is finite for any label. The reference's (epsilon) is
    finite where the label agrees with the logit: -log(1 + 1e-6) for a positive row at +80,
    though its negative term there, log(1 - 1e-6 - sigmoid(z)), is the log of a negative number
    (so that term must not be evaluated for a positive row)."""
    problem, mixed, weights = _loss_problem(0.0, rows=8, seed=13)
    problem[4][-1] = np.zeros_like(problem[4][-1])
    for logit in (80.0, -80.0):
        problem[5][-1] = np.full_like(problem[5][-1], logit)  # the output bias alone: z = logit
        agreeing = np.full(8, 1.0 if logit > 0 else 0.0, np.float32)
        for epsilon, labels in ((0.0, mixed), (1e-6, agreeing)):
            got = _fused_loss(problem, labels, weights, epsilon)
            want_loss, _ = _numpy_logistic_loss(np.full((8, 1), logit), labels, weights, epsilon)
            assert np.isfinite(got[0]) and all(np.isfinite(a).all() for a in got[1:4])
            np.testing.assert_allclose(got[0], want_loss, rtol=1e-5, atol=1e-6)


def test_logistic_loss_op_names_bad_labels_and_a_wide_output():
    x = tf.zeros([6, 4])
    kernels, biases = [tf.zeros([4, 5]), tf.zeros([5, 1])], [tf.zeros([5]), tf.zeros([1])]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels and weights must be \[6\]"):
        sigmoid_mlp_logistic_loss(x, kernels, biases, tf.zeros([5]), tf.zeros([6]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one output"):
        sigmoid_mlp_logistic_loss(x, [kernels[0], tf.zeros([5, 2])], [biases[0], tf.zeros([2])],
                                  tf.zeros([6]), tf.zeros([6]))


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("widths,repeat", [((24, 8, 1), 15), ((24, 80, 40, 1), 15),
                                           ((32, 100, 50, 1), 3)])
def test_a_rows_values_do_not_depend_on_its_place_in_the_batch(dtype, widths, repeat):
    """Dropping the first groups moves every row to another place in its block of rows (blocks
    of 255 rows for groups of 15, so odd-sized tails): its outputs must be the same bits (an
    evaluation's loss must not depend on the batch size or the number of workers)."""
    x, g, w_g, w_p, kernels, biases, _ = _problem(300 * repeat, widths, seed=repeat,
                                                  repeat=repeat, group_width=widths[0],
                                                  product=True)
    def scores(first_group):
        return sigmoid_mlp(tf.cast(x[first_group * repeat:], dtype), kernels, biases,
                           groups=tf.cast(g[first_group:], dtype), group_kernel=w_g,
                           product_kernel=w_p).numpy()
    whole = scores(0)
    for first_group in (1, 3, 7):
        np.testing.assert_array_equal(scores(first_group), whole[first_group * repeat:])


THREADS_SCRIPT = r"""
rng = np.random.default_rng(0)
f = lambda *s: tf.constant(rng.normal(size=s).astype(np.float32) * 0.2)
x, g = f(1500, 8), f(500, 8)  # groups of 3 rows; 6 blocks, the last partial
w_g, w_p = f(8, 100), f(8, 100)
kernels, biases = [f(8, 100), f(100, 50), f(50, 1)], [f(100), f(50), f(1)]
dout = f(1500, 1)
labels = tf.constant((rng.uniform(size=1500) < 0.5).astype(np.float32))
weights = tf.abs(f(1500))
out = {}
for threads in (1, 3):
    for bf16 in (False, True):
        options = dict(bf16_products=bf16, threads=threads)
        y = lib.sim_merlin_sigmoid_mlp(x, g, w_g, w_p, kernels, biases, **options)
        *d_first, d_k, d_b = lib.sim_merlin_sigmoid_mlp_grad(x, g, w_g, w_p, kernels, biases,
                                                             dout, **options)
        *l_first, l_k, l_b, loss = lib.sim_merlin_sigmoid_mlp_logistic_loss(
            x, g, w_g, w_p, kernels, biases, labels, weights, epsilon=1e-6, **options)
        out[threads, bf16] = [t.numpy() for t in (y, *d_first, *d_k, *d_b, *l_first, *l_k,
                                                  *l_b, loss)]
for bf16 in (False, True):
    for a, b in zip(out[1, bf16], out[3, bf16]):
        assert np.array_equal(a, b), "results depend on the number of threads"
print("identical")
"""


def test_own_threads_give_the_same_bits_as_one(run_with_one_intra_op_thread):
    assert "identical" in run_with_one_intra_op_thread(THREADS_SCRIPT)


def _fused_and_plain(call, variables, inputs):
    """``call()``'s value and gradients (variables and inputs) on the fused and the plain path."""
    results = []
    for plain in (False, True):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            if plain:
                with model_ops.plain_ops():
                    value = call()
            else:
                value = call()
        results.append([value, *tape.gradient(value, [*variables(), *inputs])])
    return results


def _used_ops(function, *args):
    return {op.type for op in tf.function(function).get_concrete_function(*args).graph
            .get_operations()}


@pytest.mark.parametrize("reference_compatible", [True, False])
def test_auxiliary_loss_is_the_same_on_the_fused_path(reference_compatible):
    rng = np.random.default_rng(4)
    states, positive, negative = (tf.constant(rng.normal(size=(50, 6, w)).astype(np.float32))
                                  for w in (12, 8, 8))
    mask = tf.constant(rng.uniform(size=(50, 6)) < 0.8)
    loss = AuxiliaryLoss(hidden_units=(10, 5), reference_compatible=reference_compatible)
    results = {}
    for training in (True, False):  # training: the loss op; else the MLP op, the loss in TF ops
        call = lambda: loss(states, positive, negative, mask, training=training)  # noqa: E731
        fused, plain = _fused_and_plain(call, lambda: loss.trainable_variables,
                                        [states, positive, negative])
        assert len(loss.trainable_variables) == 6
        for name, a, b in zip(["loss"] + [v.name for v in loss.trainable_variables]
                              + ["d states", "d positive", "d negative"], fused, plain):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
        results[training] = fused
        with model_ops.plain_ops():
            assert not {"SimMerlinSigmoidMlp", "SimMerlinSigmoidMlpLogisticLoss"} & _used_ops(call)
    assert "SimMerlinSigmoidMlpLogisticLoss" in _used_ops(
        lambda: loss(states, positive, negative, mask, training=True))
    evaluation = _used_ops(lambda: loss(states, positive, negative, mask))
    assert "SimMerlinSigmoidMlp" in evaluation
    assert "SimMerlinSigmoidMlpLogisticLoss" not in evaluation
    for a, b in zip(results[True], results[False]):  # the two fused paths agree too
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_dien_attention_unit_is_the_same_on_the_fused_path():
    rng = np.random.default_rng(5)
    query = tf.constant(rng.normal(size=(40, 8)).astype(np.float32))
    keys = tf.constant(rng.normal(size=(40, 7, 8)).astype(np.float32))
    mask = tf.constant(rng.uniform(size=(40, 7)) < 0.8)
    attention = TargetAttention(scoring="din", hidden_units=(9, 4))
    weights_of = lambda: tf.reduce_sum(  # noqa: E731
        attention(query, keys, mask, return_weights=True)[1] * tf.range(7, dtype=tf.float32))
    fused, plain = _fused_and_plain(weights_of, lambda: attention.trainable_variables,
                                    [query, keys])
    for a, b in zip(fused, plain):  # (the score bias's gradient is 0 up to rounding: softmax)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    assert "SimMerlinSigmoidMlp" in _used_ops(weights_of)
    relu = TargetAttention(scoring="din", hidden_units=(9, 4), activation="relu")
    assert "SimMerlinSigmoidMlp" not in _used_ops(lambda: relu(query, keys, mask))


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("steps", [2, 10])
def test_logistic_loss_with_group_steps_is_the_loss_of_the_copy_without_last_steps(dtype, steps):
    """group_steps S: groups [M * S, G] whose rows are the M (S - 1) groups and each sample's
    last step (in no group). The same loss and gradients, bit for bit, as the op given the copy
    of the groups without those last steps; their gradient rows are zero. 40 samples of pairs:
    blocks of 128 groups span samples."""
    rng = np.random.default_rng(steps)
    samples, width, units = 40, 12, (100, 50, 1)
    rows = samples * (steps - 1) * 2
    x = tf.cast(rng.normal(size=(rows, 32)).astype(np.float32), dtype)
    whole = tf.cast(rng.normal(size=(samples * steps, width)).astype(np.float32), dtype)
    without_last = tf.reshape(tf.reshape(whole, [samples, steps, width])[:, :-1], [-1, width])
    shapes = [(32, units[0]), (units[0], units[1]), (units[1], 1)]
    kernels = [tf.constant(rng.normal(size=s).astype(np.float32) * 0.2) for s in shapes]
    biases = [tf.constant(rng.normal(size=s[1]).astype(np.float32) * 0.1) for s in shapes]
    group_kernel = tf.constant(rng.normal(size=(width, units[0])).astype(np.float32) * 0.2)
    labels = np.tile(np.array([1.0, 0.0], np.float32), rows // 2)
    weights = rng.uniform(size=rows).astype(np.float32)

    def run(groups, group_steps):
        with tf.GradientTape() as tape:
            tape.watch([x, groups, *kernels, group_kernel])
            loss = sigmoid_mlp_logistic_loss(x, kernels, biases, labels, weights, groups=groups,
                                             group_kernel=group_kernel, epsilon=1e-6,
                                             group_steps=group_steps)
        return loss, tape.gradient(loss, [x, groups, *kernels, group_kernel])

    loss, grads = run(whole, steps)
    want_loss, want_grads = run(without_last, 0)
    assert loss.numpy() == want_loss.numpy()
    d_groups = tf.reshape(grads[1], [samples, steps, width]).numpy()
    assert grads[1].dtype == dtype and not d_groups[:, -1].any()
    np.testing.assert_array_equal(d_groups[:, :-1].reshape(-1, width), want_grads[1].numpy())
    for got, want in zip(grads[:1] + grads[2:], want_grads[:1] + want_grads[2:]):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_group_steps_that_do_not_divide_the_groups_are_named():
    x, kernels, biases = tf.zeros([8, 3]), [tf.zeros([3, 2]), tf.zeros([2, 1])], [tf.zeros([2]),
                                                                               tf.zeros([1])]
    with pytest.raises(tf.errors.InvalidArgumentError, match="whole samples of group_steps = 3"):
        sigmoid_mlp_logistic_loss(x, kernels, biases, tf.zeros([8]), tf.zeros([8]),
                                  groups=tf.zeros([5, 4]), group_kernel=tf.zeros([4, 2]),
                                  group_steps=3)
    with pytest.raises(ValueError, match="group_steps needs groups"):
        sigmoid_mlp_logistic_loss(x, kernels, biases, tf.zeros([8]), tf.zeros([8]),
                                  group_steps=3)
