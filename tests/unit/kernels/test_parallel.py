"""The kernels' helper threads (parallel.h): with a one-thread intra-op pool a kernel splits its
work into chunks that it and a team of kept helper threads take from a shared counter. The
values must not depend on the number of threads, on which thread took which chunk, nor on other
kernels using the helpers at the same time."""


def test_kernels_called_at_once_from_many_threads_give_the_values_of_one_thread(
        run_with_one_intra_op_thread):
    # Six Python threads call kernels at once, more than the four helper teams: some calls find
    # every team taken and run on their own thread. Each result is compared bit for bit with the
    # same call on one thread (threads=1), made before.
    out = run_with_one_intra_op_thread("""
import threading
rng = np.random.default_rng(0)
cases = []
for k in range(6):
    rows, width = 3000 + 517 * k, 48 + 16 * (k % 3)
    x = tf.constant(rng.normal(size=(rows, width)).astype(np.float32), tf.bfloat16)
    a = tf.constant(rng.normal(size=(width,)).astype(np.float32) * 0.3, tf.bfloat16)
    dy = tf.constant(rng.normal(size=(rows, width)).astype(np.float32), tf.bfloat16)
    ref = [t.numpy() for t in (lib.sim_merlin_prelu(x, a, threads=1),
                               *lib.sim_merlin_prelu_grad(x, a, dy, threads=1))]
    cases.append((x, a, dy, ref))
bits = lambda t: tf.bitcast(t, tf.uint16).numpy() if t.dtype == tf.bfloat16 else t.numpy()
failures, calls = [], [0] * len(cases)

def run(k):
    x, a, dy, ref = cases[k]
    for _ in range(25):
        for threads in (2, 3):
            got = [lib.sim_merlin_prelu(x, a, threads=threads),
                   *lib.sim_merlin_prelu_grad(x, a, dy, threads=threads)]
            for g, r in zip(got, ref):
                if not np.array_equal(bits(g), bits(tf.constant(r, g.dtype))):
                    failures.append((k, threads))
            calls[k] += 1

workers = [threading.Thread(target=run, args=(k,)) for k in range(len(cases))]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(len(failures), sum(calls))
""")
    assert out.split()[-2:] == ["0", "300"]


def test_the_slope_gradient_sums_do_not_depend_on_the_threads(run_with_one_intra_op_thread):
    # PReLU's slope gradient is summed per block of rows, then over the blocks in order: any
    # number of threads, taking the blocks in any order, gives the same float32 sums.
    out = run_with_one_intra_op_thread("""
rng = np.random.default_rng(1)
x = tf.constant(rng.normal(size=(20000, 40)).astype(np.float32), tf.bfloat16)
a = tf.constant(np.full(40, 0.25, np.float32), tf.bfloat16)
dy = tf.constant(rng.normal(size=(20000, 40)).astype(np.float32), tf.bfloat16)
sums = [lib.sim_merlin_prelu_grad(x, a, dy, threads=t)[1].numpy() for t in (1, 2, 3, 4, 2, 3)]
print(all(np.array_equal(s, sums[0]) for s in sums))
x32, dy32 = tf.cast(x, tf.float32).numpy(), tf.cast(dy, tf.float32).numpy()
want = np.where(x32 < 0, x32 * dy32, 0.0).astype(np.float64).sum(axis=0)
print(bool(np.allclose(tf.cast(sums[0], tf.float32).numpy(), want, rtol=2e-2, atol=1.0)))
""")
    assert out.split()[-2:] == ["True", "True"]
