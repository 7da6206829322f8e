"""The fused sigmoid MLP against numpy (values and every gradient, float32 and bfloat16 products,
with the first layer given as a pre-activation or as per-row inputs plus a part shared by groups
of rows), and the blocks that use it (auxiliary loss, DIEN's attention unit) against their plain
paths."""
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.blocks.attention import TargetAttention
from sim_merlin.blocks.interest import AuxiliaryLoss
from sim_merlin.kernels import model_ops
from sim_merlin.kernels.build import load
from sim_merlin.kernels.sigmoid_mlp import sigmoid_mlp

pytestmark = pytest.mark.compat_lock

HAS_BF16_PRODUCTS = "avx512_bf16" in Path("/proc/cpuinfo").read_text()


def _bf16(x):
    """float32 -> nearest bfloat16 (ties to even), back in float32, as the kernels round."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_mlp(pre, kernels, biases, dout, bf16):
    """Forward and backward in float64; with ``bf16`` the hidden products' operands are rounded
    to bfloat16 first (the output layer's are not)."""
    last = len(kernels) - 1
    operand = lambda x, i: _bf16(x) if bf16 and i < last else x  # noqa: E731
    activations = [_sigmoid(pre.astype(np.float64))]
    for i, (kernel, bias) in enumerate(zip(kernels, biases)):
        z = operand(activations[i], i).astype(np.float64) @ operand(kernel, i) + bias
        if i < last:
            activations.append(_sigmoid(z))
    out, d = z, dout.astype(np.float64)
    kernel_grads, bias_grads = [None] * len(kernels), [None] * len(kernels)
    for i in range(last, -1, -1):
        kernel_grads[i] = operand(activations[i], i).T @ operand(d, i)
        bias_grads[i] = d.sum(axis=0)
        d = (operand(d, i) @ operand(kernels[i], i).T) * activations[i] * (1 - activations[i])
    return out, d, kernel_grads, bias_grads


def _problem(rows, widths, seed):
    rng = np.random.default_rng(seed)
    pre = rng.normal(size=(rows, widths[0])).astype(np.float32) * 2
    kernels = [(rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
               for a, b in zip(widths, widths[1:])]
    biases = [rng.normal(size=(b,)).astype(np.float32) for b in widths[1:]]
    dout = rng.normal(size=(rows, widths[-1])).astype(np.float32)
    return pre, kernels, biases, dout


def _fused(pre, kernels, biases, dout, dtype):
    pre_t = tf.constant(pre)
    kernel_vs = [tf.Variable(k) for k in kernels]
    bias_vs = [tf.Variable(b) for b in biases]
    with tf.GradientTape() as tape:
        tape.watch(pre_t)
        out = sigmoid_mlp(tf.cast(pre_t, dtype), kernel_vs, bias_vs)
        loss = tf.reduce_sum(out * dout)
    grads = tape.gradient(loss, [pre_t, kernel_vs, bias_vs])
    return out.numpy(), grads[0].numpy(), [g.numpy() for g in grads[1]], [
        g.numpy() for g in grads[2]]


def test_the_fused_mlp_is_in_the_library():
    assert model_ops.available(), "the fused kernels did not build; see the message above"
    assert hasattr(load(), "sim_merlin_sigmoid_mlp")


@pytest.mark.parametrize("rows", [5, 700])  # one partial block; two full blocks and a partial
@pytest.mark.parametrize("widths", [(100, 50, 1), (7, 5, 3, 2), (9, 1)])
def test_float32_values_and_gradients_match_numpy(rows, widths):
    pre, kernels, biases, dout = _problem(rows, widths, seed=rows + len(widths))
    out, d_pre, d_kernels, d_biases = _fused(pre, kernels, biases, dout, tf.float32)
    want = _numpy_mlp(pre, kernels, biases, dout, bf16=False)
    assert out.dtype == np.float32 and out.shape == (rows, widths[-1])
    np.testing.assert_allclose(out, want[0], rtol=1e-5, atol=1e-5, err_msg="outputs")
    np.testing.assert_allclose(d_pre, want[1], rtol=1e-4, atol=1e-6, err_msg="d pre")
    for i, (got, expected) in enumerate(zip(d_kernels, want[2])):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"d kernel {i}")
    for i, (got, expected) in enumerate(zip(d_biases, want[3])):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"d bias {i}")


@pytest.mark.parametrize("widths", [(100, 50, 1), (80, 40, 1), (7, 5, 3, 2)])
def test_bfloat16_products_round_the_hidden_operands(widths):
    """A bfloat16 pre-activation selects bfloat16 products with float32 sums for the hidden
    layers (as oneDNN's under mixed_bfloat16), where the CPU has them; the result is float32."""
    pre, kernels, biases, dout = _problem(600, widths, seed=3)
    pre = _bf16(pre)  # what a bfloat16 pre-activation holds
    out, d_pre, d_kernels, _ = _fused(pre, kernels, biases, dout, tf.bfloat16)
    assert out.dtype == np.float32
    rounded = _numpy_mlp(pre, kernels, biases, dout, bf16=True)
    exact = _numpy_mlp(pre, kernels, biases, dout, bf16=False)
    want = rounded if HAS_BF16_PRODUCTS else exact
    np.testing.assert_allclose(out, want[0], rtol=1e-3, atol=1e-3, err_msg="outputs")
    np.testing.assert_allclose(d_pre, want[1], rtol=1e-2, atol=1e-3, err_msg="d pre")
    np.testing.assert_allclose(d_kernels[0], want[2][0], rtol=1e-2, atol=1e-2, err_msg="d K0")
    if HAS_BF16_PRODUCTS:  # closer to the rounded arithmetic than to the exact one
        error = lambda reference: np.abs(out - reference[0]).mean()  # noqa: E731
        assert error(rounded) < error(exact) / 4


def test_a_bfloat16_pre_activation_is_converted_inside_as_a_cast_would():
    """No Cast op over the pre-activation or its gradient: bit for bit what casting around the
    float32 op gives."""
    lib = load()
    rng = np.random.default_rng(9)
    shared, kernels, biases, dout = _problem(301, (37, 5, 1), seed=9)
    inputs = rng.normal(size=(602, 6)).astype(np.float32)
    first = rng.normal(size=(6, 37)).astype(np.float32)
    dout = np.concatenate([dout, dout])
    low = [tf.cast(t, tf.bfloat16) for t in (inputs, shared)]
    options = dict(bf16_products=True, threads=1)
    as_float = [tf.cast(t, tf.float32) for t in low]
    outputs = [lib.sim_merlin_sigmoid_mlp(*xs, first, kernels, biases, **options)
               for xs in (low, as_float)]
    np.testing.assert_array_equal(outputs[0].numpy(), outputs[1].numpy())
    grads = [lib.sim_merlin_sigmoid_mlp_grad(*xs, first, kernels, biases, dout, **options)
             for xs in (low, as_float)]
    for i in (0, 1):  # the inputs' and the shared part's gradients
        assert grads[0][i].dtype == tf.bfloat16
        np.testing.assert_array_equal(
            tf.bitcast(grads[0][i], tf.uint16).numpy(),
            tf.bitcast(tf.cast(grads[1][i], tf.bfloat16), tf.uint16).numpy())
    for got, want in zip([grads[0][2], *grads[0][3], *grads[0][4]],
                         [grads[1][2], *grads[1][3], *grads[1][4]]):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_no_rows_gives_empty_outputs_and_zero_weight_gradients():
    pre, kernels, biases, dout = _problem(0, (4, 3, 1), seed=0)
    out, d_pre, d_kernels, d_biases = _fused(pre, kernels, biases, dout, tf.float32)
    assert out.shape == (0, 1) and d_pre.shape == (0, 4)
    assert all(not g.any() for g in d_kernels + d_biases)


def test_mismatched_weights_are_named():
    pre = tf.zeros([3, 4])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"kernels\[1\] must be \[5, units\]"):
        sigmoid_mlp(pre, [tf.zeros([4, 5]), tf.zeros([6, 1])], [tf.zeros([5]), tf.zeros([1])])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"biases\[0\] must have 5 elements"):
        sigmoid_mlp(pre, [tf.zeros([4, 5]), tf.zeros([5, 1])], [tf.zeros([4]), tf.zeros([1])])
    with pytest.raises(ValueError, match="as many biases as kernels"):
        sigmoid_mlp(pre, [tf.zeros([4, 1])], [])



def _grouped_problem(groups, repeat, width, widths, seed):
    rng = np.random.default_rng(seed)
    shared, kernels, biases, _ = _problem(groups, widths, seed)
    inputs = rng.normal(size=(groups * repeat, width)).astype(np.float32)
    first = (rng.normal(size=(width, widths[0])) / np.sqrt(width)).astype(np.float32)
    dout = rng.normal(size=(groups * repeat, widths[-1])).astype(np.float32)
    return inputs, shared, first, kernels, biases, dout


def _numpy_grouped(inputs, shared, first, kernels, biases, dout, bf16):
    """pre = inputs first + shared repeated over each group, then :func:`_numpy_mlp`; the
    first product's operands rounded to bfloat16 with ``bf16`` (it is a hidden product)."""
    repeat = len(inputs) // len(shared)
    operand = _bf16 if bf16 else (lambda x: x)
    pre = (operand(inputs).astype(np.float64) @ operand(first)
           + np.repeat(shared.astype(np.float64), repeat, axis=0))
    out, d_pre, kernel_grads, bias_grads = _numpy_mlp(pre, kernels, biases, dout, bf16)
    d_shared = d_pre.reshape(len(shared), repeat, -1).sum(axis=1)
    d_inputs = operand(d_pre) @ operand(first).T
    d_first = operand(inputs).T @ operand(d_pre)
    return out, d_inputs, d_shared, d_first, kernel_grads, bias_grads


def _fused_grouped(inputs, shared, first, kernels, biases, dout, dtype):
    constants = [tf.constant(t) for t in (inputs, shared)]
    variables = [tf.Variable(t) for t in [first, *kernels, *biases]]
    layers = len(kernels)
    with tf.GradientTape() as tape:
        tape.watch(constants)
        out = sigmoid_mlp(tf.cast(constants[1], dtype), variables[1:1 + layers],
                          variables[1 + layers:], inputs=tf.cast(constants[0], dtype),
                          first_kernel=variables[0])
        loss = tf.reduce_sum(out * dout)
    grads = [g.numpy() for g in tape.gradient(loss, constants + variables)]
    return (out.numpy(), grads[0], grads[1], grads[2], grads[3:3 + layers], grads[3 + layers:])


# repeat 2: the auxiliary tower's pairs; 10: the attention unit's steps; 7 does not divide the
# 256 rows of a block (blocks of 252 rows); 300 groups of 7 = 2,100 rows: 9 blocks, one partial.
@pytest.mark.parametrize("groups,repeat", [(1, 1), (300, 2), (90, 10), (300, 7)])
def test_a_first_layer_shared_by_groups_of_rows_matches_numpy(groups, repeat):
    problem = _grouped_problem(groups, repeat, 6, (9, 5, 1), seed=groups + repeat)
    got = _fused_grouped(*problem, tf.float32)
    want = _numpy_grouped(*problem, bf16=False)
    names = ["outputs", "d inputs", "d shared", "d first kernel"]
    for name, a, b in zip(names, got[:4], want[:4]):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    for a, b in zip(got[4] + got[5], want[4] + want[5]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg="later layers")


def test_a_shared_first_layer_with_bfloat16_inputs_rounds_its_product_operands():
    problem = _grouped_problem(200, 2, 32, (100, 50, 1), seed=11)
    inputs, shared = _bf16(problem[0]), _bf16(problem[1])  # what bfloat16 tensors hold
    problem = (inputs, shared, *problem[2:])
    got = _fused_grouped(*problem, tf.bfloat16)
    rounded = _numpy_grouped(*problem, bf16=True)
    exact = _numpy_grouped(*problem, bf16=False)
    want = rounded if HAS_BF16_PRODUCTS else exact
    np.testing.assert_allclose(got[0], want[0], rtol=1e-3, atol=1e-3, err_msg="outputs")
    # the gradients of inputs and shared are bfloat16 tensors: compare at that precision
    np.testing.assert_allclose(got[1], want[1], rtol=2e-2, atol=2e-3, err_msg="d inputs")
    np.testing.assert_allclose(got[2], want[2], rtol=2e-2, atol=2e-3, err_msg="d shared")
    np.testing.assert_allclose(got[3], want[3], rtol=1e-2, atol=1e-2, err_msg="d first kernel")
    if HAS_BF16_PRODUCTS:
        error = lambda reference: np.abs(got[3] - reference[3]).mean()  # noqa: E731
        assert error(rounded) < error(exact) / 4


def test_rows_that_are_not_whole_groups_and_a_wrong_first_kernel_are_named():
    kernels, biases = [tf.zeros([4, 1])], [tf.zeros([1])]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"whole number of groups"):
        sigmoid_mlp(tf.zeros([3, 4]), kernels, biases, inputs=tf.zeros([7, 2]),
                    first_kernel=tf.zeros([2, 4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"first_kernel must be \[2, 4\]"):
        sigmoid_mlp(tf.zeros([3, 4]), kernels, biases, inputs=tf.zeros([6, 2]),
                    first_kernel=tf.zeros([3, 4]))
    with pytest.raises(ValueError, match="together"):
        sigmoid_mlp(tf.zeros([3, 4]), kernels, biases, inputs=tf.zeros([6, 2]))


THREADS_SCRIPT = r"""
rng = np.random.default_rng(0)
shared = tf.constant(rng.normal(size=(500, 100)).astype(np.float32))  # 6 blocks, the last partial
inputs = tf.constant(rng.normal(size=(1500, 8)).astype(np.float32))  # groups of 3 rows
first = tf.constant(rng.normal(size=(8, 100)).astype(np.float32))
kernels = [tf.constant(rng.normal(size=s).astype(np.float32) * 0.2) for s in [(100, 50), (50, 1)]]
biases = [tf.constant(rng.normal(size=(s,)).astype(np.float32)) for s in (50, 1)]
dout = tf.constant(rng.normal(size=(1500, 1)).astype(np.float32))
out = {}
for threads in (1, 3):
    for bf16 in (False, True):
        options = dict(bf16_products=bf16, threads=threads)
        y = lib.sim_merlin_sigmoid_mlp(inputs, shared, first, kernels, biases, **options)
        d_x, d_shared, d_first, d_k, d_b = lib.sim_merlin_sigmoid_mlp_grad(
            inputs, shared, first, kernels, biases, dout, **options)
        out[threads, bf16] = [t.numpy() for t in (y, d_x, d_shared, d_first, *d_k, *d_b)]
for bf16 in (False, True):
    for x, y in zip(out[1, bf16], out[3, bf16]):
        assert np.array_equal(x, y), "results depend on the number of threads"
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
    call = lambda: loss(states, positive, negative, mask)  # noqa: E731
    fused, plain = _fused_and_plain(call, lambda: loss.trainable_variables,
                                    [states, positive, negative])
    assert len(loss.trainable_variables) == 6
    for name, a, b in zip(["loss"] + [v.name for v in loss.trainable_variables]
                          + ["d states", "d positive", "d negative"], fused, plain):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    assert "SimMerlinSigmoidMlp" in _used_ops(call)
    with model_ops.plain_ops():
        assert "SimMerlinSigmoidMlp" not in _used_ops(call)


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
