"""The fused lookup op (embedding_rows.cc) against gather + cast + concat in TensorFlow ops: the
same bits forward (every float32 bit pattern, NaN and infinities included) and the same
IndexedSlices gradients; ids outside a table named; the one-thread pool path."""
import contextlib

import numpy as np
import pytest

import sim_merlin  # noqa: F401  (before tensorflow)
import tensorflow as tf

from sim_merlin.kernels import build, embedding_rows

pytestmark = [pytest.mark.compat_lock,
              pytest.mark.skipif(not build.usable(), reason="fused kernels not built here")]


def tables_and_ids(seed=0, batch=(6, 9)):
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(50, 16)).astype(np.float32)
    # Every kind of float32: random bit patterns (NaNs of both signs and any payload, denormals,
    # infinities), ties that round to even, and the largest finite value.
    items[1:40] = np.frombuffer(rng.integers(0, 2**32, 39 * 16, dtype=np.uint32).tobytes(),
                                np.float32).reshape(39, 16)
    items[0, :12] = [np.nan, -np.nan, np.inf, -np.inf, 1e-40, -1e-40, 0.0, -0.0, 3.4028235e38,
                     1.0000001, 1.00390625, 1.01171875]
    categories = rng.normal(size=(7, 5)).astype(np.float32)
    item_ids = rng.integers(0, 50, batch)
    item_ids.flat[:2] = [0, 1]
    return (tf.Variable(items), tf.Variable(categories)), (
        tf.constant(item_ids), tf.constant(rng.integers(0, 7, batch)))


def plain(tables, ids, dtype):
    return tf.concat([tf.cast(tf.gather(t, i), dtype) for t, i in zip(tables, ids)], -1)


def bits(x):
    return tf.bitcast(x, tf.uint16 if x.dtype == tf.bfloat16 else tf.uint32).numpy()


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("index_dtype", [tf.int32, tf.int64])
def test_rows_are_the_bits_of_gather_cast_concat(dtype, index_dtype):
    tables, ids = tables_and_ids()
    ids = [tf.cast(i, index_dtype) for i in ids]
    got = embedding_rows.embedding_rows(tables, ids, dtype)
    assert got.dtype == dtype and got.shape == (6, 9, 21)
    np.testing.assert_array_equal(bits(got), bits(plain(tables, ids, dtype)))
    # One table, scalar ids per row (the target item's lookup).
    one = embedding_rows.embedding_rows(tables[:1], [ids[0][:, 0]], dtype)
    np.testing.assert_array_equal(bits(one), bits(plain(tables[:1], [ids[0][:, 0]], dtype)))


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_gradients_are_the_indexed_slices_of_the_gathers(dtype):
    tables, ids = tables_and_ids(1)
    tables = [tf.Variable(tf.random.stateless_normal(t.shape, [3, 4])) for t in tables]
    upstream = tf.cast(tf.random.stateless_normal([6, 9, 21], [5, 6]), dtype)

    @tf.function
    def gradients(fused):
        with tf.GradientTape() as tape:
            rows = (embedding_rows.embedding_rows(tables, ids, dtype) if fused
                    else plain(tables, ids, dtype))
            loss = tf.reduce_sum(tf.cast(rows * upstream, tf.float32))
        return tape.gradient(loss, tables)

    for got, want, table in zip(gradients(True), gradients(False), tables):
        assert isinstance(got, tf.IndexedSlices)
        np.testing.assert_array_equal(got.indices.numpy(), want.indices.numpy())
        np.testing.assert_array_equal(got.values.numpy(), want.values.numpy())
        np.testing.assert_array_equal(got.dense_shape.numpy(), table.shape.as_list())
    # Independently: the dense gradient of row r sums the upstream slices of the steps reading it.
    dense = tf.convert_to_tensor(gradients(True)[1]).numpy()
    expected = np.zeros([7, 5], np.float32)
    np.add.at(expected, ids[1].numpy().reshape(-1),
              tf.cast(upstream, tf.float32).numpy()[..., 16:].reshape(-1, 5))
    np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-6)


def test_an_id_outside_its_table_is_named():
    tables, ids = tables_and_ids()
    ids = [ids[0], ids[1] + 7]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"ids\[1\] .* is not in \[0, 7\)"):
        embedding_rows.embedding_rows(tables, ids)
    with pytest.raises(ValueError, match="one ids tensor per table"):
        embedding_rows.embedding_rows(tables, ids[:1])


def test_reads_follow_the_updates_before_them_in_a_function():
    table = tf.Variable(tf.zeros([4, 2]))

    @tf.function
    def update_then_read():
        table.scatter_add(tf.IndexedSlices(tf.ones([1, 2]), tf.constant([3])))
        return embedding_rows.embedding_rows([table], [tf.constant([3, 0])])

    np.testing.assert_array_equal(update_then_read().numpy(), [[1, 1], [0, 0]])
    np.testing.assert_array_equal(update_then_read().numpy(), [[2, 2], [0, 0]])


def test_own_threads_give_the_same_rows(run_with_one_intra_op_thread):
    out = run_with_one_intra_op_thread("""
from sim_merlin.kernels import embedding_rows
rng = np.random.default_rng(0)
tables = [tf.Variable(rng.normal(size=(1000, 16)).astype(np.float32)),
          tf.Variable(rng.normal(size=(30, 16)).astype(np.float32))]
ids = [tf.constant(rng.integers(0, 1000, (512, 20))), tf.constant(rng.integers(0, 30, (512, 20)))]
upstream = tf.cast(tf.random.stateless_normal([512, 20, 32], [1, 2]), tf.bfloat16)
with tf.GradientTape(persistent=True) as tape:
    got = embedding_rows.embedding_rows(tables, ids, tf.bfloat16)
    want = tf.concat([tf.cast(tf.gather(t, i), tf.bfloat16) for t, i in zip(tables, ids)], -1)
    losses = [tf.reduce_sum(tf.cast(x * upstream, tf.float32)) for x in (got, want)]
print(bool(np.array_equal(tf.bitcast(got, tf.uint16).numpy(), tf.bitcast(want, tf.uint16).numpy())))
big, small = tape.gradient(losses[0], tables)
want_big, want_small = tape.gradient(losses[1], tables)
print(bool(np.array_equal(big.values.numpy(), want_big.values.numpy())))
# 10,240 reads of a 30-row table: its gradient comes summed per row (tested below).
print(small.values.shape == (30, 16) and list(small.indices.numpy()) == list(range(30)))
print(bool(np.allclose(tf.convert_to_tensor(small).numpy(),
                       tf.convert_to_tensor(want_small).numpy(), rtol=1e-5, atol=1e-4)))
""")
    assert out.split()[-4:] == ["True", "True", "True", "True"]


@pytest.mark.parametrize("index_dtype", [tf.int32, tf.int64])
def test_a_small_table_read_many_times_gets_its_gradient_summed_per_row(index_dtype):
    # 3 x 700 reads: at least 16 per row of the 40-row table (summed), not of the 1000-row one.
    rng = np.random.default_rng(4)
    tables = [tf.Variable(rng.normal(size=(1000, 3)).astype(np.float32)),
              tf.Variable(rng.normal(size=(40, 2)).astype(np.float32))]
    ids = [tf.constant(rng.integers(0, 1000, (3, 700)), index_dtype),
           tf.constant(rng.integers(0, 39, (3, 700)), index_dtype)]  # row 39 never read
    upstream = tf.cast(tf.random.stateless_normal([3, 700, 5], [1, 1]), tf.bfloat16)
    with tf.GradientTape() as tape:
        rows = embedding_rows.embedding_rows(tables, ids, tf.bfloat16)
        loss = tf.reduce_sum(tf.cast(rows * upstream, tf.float32))
    large, small = tape.gradient(loss, tables)
    assert large.values.shape == (2100, 3)  # one row per id
    np.testing.assert_array_equal(large.indices.numpy(), ids[0].numpy().reshape(-1))
    # One row per table row read (row 39 is not: no entry, so a lazy optimizer leaves it).
    assert small.values.shape == (39, 2)
    np.testing.assert_array_equal(small.indices.numpy(), np.arange(39))
    expected = np.zeros([40, 2])
    np.add.at(expected, ids[1].numpy().reshape(-1),
              tf.cast(upstream, tf.float32).numpy()[..., 3:].reshape(-1, 2).astype(np.float64))
    np.testing.assert_allclose(tf.convert_to_tensor(small).numpy(), expected, rtol=1e-5,
                               atol=1e-4)


def _masked_plain(tables, ids, dtype, mask):
    return plain(tables, ids, dtype) * tf.cast(mask[..., None], dtype)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_a_mask_gives_the_values_and_gradients_of_multiplying_by_it(dtype):
    """Masked positions: zero rows forward, zero gradient rows backward, as the product by the
    mask (values equal: only the sign of a zero may differ, x * 0 being -0 for x < 0). The small
    table (summed gradient) still lists a row read only at masked positions, with zeros."""
    rng = np.random.default_rng(8)
    tables = [tf.Variable(rng.normal(size=(1000, 4)).astype(np.float32)),
              tf.Variable(rng.normal(size=(20, 3)).astype(np.float32))]
    ids = [tf.constant(rng.integers(0, 1000, (40, 30))), tf.constant(rng.integers(1, 20, (40, 30)))]
    mask = rng.uniform(size=(40, 30)) < 0.6
    ids[1] = tf.where(mask, ids[1], 0)  # table row 0 of the small table: read, always masked
    mask = tf.constant(mask)
    upstream = tf.cast(tf.random.stateless_normal([40, 30, 7], [2, 3]), dtype)
    with tf.GradientTape(persistent=True) as tape:
        got = embedding_rows.embedding_rows(tables, ids, dtype, mask=mask)
        want = _masked_plain(tables, ids, dtype, mask)
        losses = [tf.reduce_sum(tf.cast(x * upstream, tf.float32)) for x in (got, want)]
    assert got.dtype == dtype and got.shape == (40, 30, 7)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert not tf.cast(got, tf.float32).numpy()[~mask.numpy()].any()
    large, small = tape.gradient(losses[0], tables)
    want_large, want_small = tape.gradient(losses[1], tables)
    np.testing.assert_array_equal(large.indices.numpy(), want_large.indices.numpy())
    np.testing.assert_array_equal(large.values.numpy(), want_large.values.numpy())
    assert not large.values.numpy()[~mask.numpy().reshape(-1)].any()
    # 1,200 reads of a 20-row table: summed per row, row 0 listed (read) with a zero gradient.
    assert small.values.shape == (20, 3)
    assert small.indices.numpy().tolist() == list(range(20))
    assert not small.values.numpy()[0].any()
    expected = np.zeros([20, 3], np.float32)
    keep = mask.numpy().reshape(-1)
    np.add.at(expected, ids[1].numpy().reshape(-1)[keep],
              tf.cast(upstream, tf.float32).numpy()[..., 4:].reshape(-1, 3)[keep])
    np.testing.assert_allclose(small.values.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tf.convert_to_tensor(small).numpy(),
                               tf.convert_to_tensor(want_small).numpy(), rtol=1e-5, atol=1e-5)


def test_a_mask_of_another_shape_is_named():
    tables, ids = tables_and_ids()
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask|shape"):
        embedding_rows.embedding_rows(tables, ids, mask=tf.ones([6, 8], tf.bool))


def test_masked_positions_ids_are_still_checked():
    tables, ids = tables_and_ids()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"ids\[1\] .* is not in \[0, 7\)"):
        embedding_rows.embedding_rows(tables, [ids[0], ids[1] + 7],
                                      mask=tf.zeros([6, 9], tf.bool))


def _groups(seed=9):
    """Tables (a large one, and a small one read often enough to be summed) and three groups of
    ids: a target [8], a masked history [8, 40] and a negative history [8, 5]."""
    rng = np.random.default_rng(seed)
    tables = [tf.Variable(rng.normal(size=(1000, 16)).astype(np.float32)),
              tf.Variable(rng.normal(size=(20, 5)).astype(np.float32))]
    shapes = [(8,), (8, 40), (8, 5)]
    ids = [[tf.constant(rng.integers(0, 1000, s)), tf.constant(rng.integers(0, 20, s))]
           for s in shapes]
    masks = [None, tf.constant(rng.uniform(size=(8, 40)) < 0.7), None]
    return tables, ids, masks


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_groups_give_the_rows_of_separate_lookups_and_one_gradient_per_table(dtype):
    tables, ids, masks = _groups()
    upstream = [tf.cast(tf.random.stateless_normal(list(i[0].shape) + [21], [g, 7]), dtype)
                for g, i in enumerate(ids)]

    @tf.function
    def run(grouped):
        with tf.GradientTape() as tape:
            if grouped:
                rows = embedding_rows.embedding_row_groups(tables, ids, dtype, masks)
            else:
                rows = [embedding_rows.embedding_rows(tables, i, dtype, mask=m)
                        for i, m in zip(ids, masks)]
            loss = tf.add_n([tf.reduce_sum(tf.cast(r * u, tf.float32))
                             for r, u in zip(rows, upstream)])
        return rows, tape.gradient(loss, tables)

    got, (large, small) = run(True)
    want, (want_large, want_small) = run(False)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        np.testing.assert_array_equal(bits(g), bits(w))
    # The large table: one IndexedSlices whose rows are the groups' rows in group order (the
    # tape's concatenation of the separate lookups' slices gives the same rows and ids).
    assert isinstance(large, tf.IndexedSlices) and large.values.shape == (8 + 320 + 40, 16)
    all_ids = np.concatenate([i[0].numpy().reshape(-1) for i in ids])
    np.testing.assert_array_equal(large.indices.numpy(), all_ids)
    np.testing.assert_array_equal(large.values.numpy(), want_large.values.numpy())
    # Independently, with numpy: each id's row is its upstream slice; masked positions zero.
    up = [tf.cast(u, tf.float32).numpy() for u in upstream]
    keep = [np.ones(i[0].shape, bool) if m is None else m.numpy() for i, m in zip(ids, masks)]
    expected = np.concatenate([(u[..., :16] * k[..., None]).reshape(-1, 16)
                               for u, k in zip(up, keep)])
    np.testing.assert_array_equal(large.values.numpy(), expected)
    # The small table (368 reads of 20 rows): summed per row over all groups.
    assert small.values.shape[1] == 5 and small.values.shape[0] <= 20
    dense = np.zeros([20, 5], np.float64)
    for i, u, k in zip(ids, up, keep):
        np.add.at(dense, i[1].numpy().reshape(-1), (u[..., 16:] * k[..., None]).reshape(-1, 5))
    np.testing.assert_allclose(tf.convert_to_tensor(small).numpy(), dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tf.convert_to_tensor(small).numpy(),
                               tf.convert_to_tensor(want_small).numpy(), rtol=1e-5, atol=1e-5)


def test_groups_without_a_gradient_for_one_group_and_errors_named():
    tables, ids, masks = _groups(10)
    with tf.GradientTape() as tape:
        target, history, _ = embedding_rows.embedding_row_groups(tables, ids, tf.float32, masks)
        loss = tf.reduce_sum(target) + tf.reduce_sum(history)  # the third group unused
    large, _ = tape.gradient(loss, tables)
    values = large.values.numpy()
    assert values.shape == (368, 16)
    assert not values[328:].any()  # the unused group's rows: zero gradient
    np.testing.assert_array_equal(values[:8], np.ones([8, 16]))
    bad = [ids[0], [ids[1][0], ids[1][1] + 20], ids[2]]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"ids\[1\] of group 1 .* is not in \[0, 20\)"):
        embedding_rows.embedding_row_groups(tables, bad, tf.float32, masks)
    with pytest.raises(ValueError, match="one ids tensor per table"):
        embedding_rows.embedding_row_groups(tables, [ids[0][:1]], tf.float32)


def test_bfloat16_gradient_rows_are_the_float32_rows_narrowed_exactly():
    # A large table (more rows than are ever summed) and a small one, both looked up in
    # bfloat16; inside bfloat16_gradient_rows the large one's rows come as bfloat16.
    rng = np.random.default_rng(4)
    rows = embedding_rows.MAX_SUMMED_ROWS + 5
    large = tf.Variable(rng.normal(size=(rows, 16)).astype(np.float32))
    small = tf.Variable(rng.normal(size=(20, 5)).astype(np.float32))
    ids = [[tf.constant(rng.integers(0, rows, (8,))), tf.constant(rng.integers(0, 20, (8,)))],
           [tf.constant(rng.integers(0, rows, (8, 40))), tf.constant(rng.integers(0, 20, (8, 40)))]]
    masks = [None, tf.constant(rng.uniform(size=(8, 40)) < 0.7)]
    upstream = [tf.cast(tf.random.stateless_normal(list(i[0].shape) + [21], [g, 3]), tf.bfloat16)
                for g, i in enumerate(ids)]

    def run(half):
        @tf.function
        def gradients():
            context = (embedding_rows.bfloat16_gradient_rows([large, small]) if half
                       else contextlib.nullcontext())
            with tf.GradientTape() as tape, context:
                looked_up = embedding_rows.embedding_row_groups([large, small], ids, tf.bfloat16,
                                                                masks)
                loss = tf.add_n([tf.reduce_sum(tf.cast(r * u, tf.float32))
                                 for r, u in zip(looked_up, upstream)])
            return tape.gradient(loss, [large, small])
        return gradients()

    (half_large, half_small), (full_large, full_small) = run(True), run(False)
    assert half_large.values.dtype == tf.bfloat16 and full_large.values.dtype == tf.float32
    assert half_small.values.dtype == tf.float32  # a small table's sums stay float32
    np.testing.assert_array_equal(half_large.indices.numpy(), full_large.indices.numpy())
    # Exact: widening the bfloat16 rows gives the float32 rows' bits (masked rows +0.0).
    np.testing.assert_array_equal(bits(tf.cast(half_large.values, tf.float32)),
                                  bits(full_large.values))
    keep = masks[1].numpy().reshape(-1)
    assert not bits(half_large.values)[8:][~keep].any()
    np.testing.assert_array_equal(half_small.values.numpy(), full_small.values.numpy())
    # Outside a function (eagerly) the context changes nothing.
    with tf.GradientTape() as tape, embedding_rows.bfloat16_gradient_rows([large]):
        looked_up = embedding_rows.embedding_row_groups([large, small], ids[:1], tf.bfloat16)
        loss = tf.reduce_sum(tf.cast(looked_up[0], tf.float32))
    assert tape.gradient(loss, large).values.dtype == tf.float32


def test_bfloat16_gradient_rows_are_refused_where_they_would_be_summed_or_widened():
    small = tf.Variable(np.zeros([20, 4], np.float32))
    ids = tf.constant([[1, 2]])
    grad = embedding_rows._library().sim_merlin_embedding_row_groups_grad
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="never summed"):
        grad([tf.zeros([1, 2, 4], tf.bfloat16)], [ids], [], N=1, masked=[False], widths=[4],
             table_rows=[20], Tvalues=[tf.bfloat16])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="bfloat16 rows_grad"):
        grad([tf.zeros([1, 2, 4], tf.float32)], [ids], [], N=1, masked=[False], widths=[4],
             table_rows=[40000], Tvalues=[tf.bfloat16])
