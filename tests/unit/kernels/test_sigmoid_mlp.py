"""The fused sigmoid MLP against numpy (values and every gradient, float32 and bfloat16 products),
and the blocks that use it (auxiliary loss, DIEN's attention unit) against their plain paths."""
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
    pre, kernels, biases, dout = _problem(301, (37, 5, 1), seed=9)
    low = tf.cast(pre, tf.bfloat16)
    options = dict(bf16_products=True, threads=1)
    outputs = [lib.sim_merlin_sigmoid_mlp(x, kernels, biases, **options)
               for x in (low, tf.cast(low, tf.float32))]
    np.testing.assert_array_equal(outputs[0].numpy(), outputs[1].numpy())
    grads = [lib.sim_merlin_sigmoid_mlp_grad(x, kernels, biases, dout, **options)
             for x in (low, tf.cast(low, tf.float32))]
    assert grads[0][0].dtype == tf.bfloat16
    np.testing.assert_array_equal(tf.bitcast(grads[0][0], tf.uint16).numpy(),
                                  tf.bitcast(tf.cast(grads[1][0], tf.bfloat16), tf.uint16).numpy())
    for got, want in zip(grads[0][1] + grads[0][2], grads[1][1] + grads[1][2]):
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


THREADS_SCRIPT = r"""
rng = np.random.default_rng(0)
pre = tf.constant(rng.normal(size=(1500, 100)).astype(np.float32))  # 6 blocks, the last partial
kernels = [tf.constant(rng.normal(size=s).astype(np.float32) * 0.2) for s in [(100, 50), (50, 1)]]
biases = [tf.constant(rng.normal(size=(s,)).astype(np.float32)) for s in (50, 1)]
dout = tf.constant(rng.normal(size=(1500, 1)).astype(np.float32))
out = {}
for threads in (1, 3):
    for bf16 in (False, True):
        y = lib.sim_merlin_sigmoid_mlp(pre, kernels, biases, bf16_products=bf16, threads=threads)
        d_pre, d_k, d_b = lib.sim_merlin_sigmoid_mlp_grad(pre, kernels, biases, dout,
                                                          bf16_products=bf16, threads=threads)
        out[threads, bf16] = [t.numpy() for t in (y, d_pre, *d_k, *d_b)]
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
