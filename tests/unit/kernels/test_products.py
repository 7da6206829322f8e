"""The kernels' bfloat16 products: on AMX tiles where the CPU has them, else AVX512-BF16 dot
products; both paths give the same results up to the order of the float32 sums."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.compat_lock

CPU_FLAGS = Path("/proc/cpuinfo").read_text()
HAS_AMX = all(f" {flag}" in CPU_FLAGS for flag in ("amx_tile", "amx_bf16"))

SCRIPT = r"""
import sys
import numpy as np
import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf
from sim_merlin.kernels.build import load
lib = load()
rng = np.random.default_rng(0)
B, T, u, F = 300, 5, 6, 7  # row blocks of 128, 128 and 44; widths that are not whole tiles
f = lambda *s: tf.constant(rng.normal(size=s).astype(np.float32) * 0.5)  # noqa: E731
x, states, d_states = f(B, T, F), f(B, T, u), f(B, T, u)
W, bx, U, b, Wg, Wc = f(F, 3 * u), f(3 * u), f(u, 3 * u), f(3 * u), f(u, 2 * u), f(u, u)
mask = tf.constant((rng.uniform(size=(B, T)) < 0.8).astype(np.float32))
scores = tf.constant(rng.uniform(size=(B, T)).astype(np.float32))
inputs, groups, d_out = f(700, 11), f(350, 11), f(700, 1)  # pairs of rows
group_kernel, product_kernel = f(11, 37), f(11, 37)
kernels, biases = [f(11, 37), f(37, 20), f(20, 1)], [f(37), f(20), f(1)]
o = dict(bf16_products=True, threads=1)
results = [lib.sim_merlin_gru(x, W, bx, U, b, mask, **o)[0],
           *lib.sim_merlin_gru_grad(x, W, bx, U, b, mask, states, d_states, tf.zeros([0]), **o),
           lib.sim_merlin_augru(x, W, bx, Wg, Wc, scores, mask, **o)[0],
           *lib.sim_merlin_augru_grad(x, W, bx, Wg, Wc, scores, mask, d_states[:, 0],
                                      tf.zeros([0]), **o),
           lib.sim_merlin_sigmoid_mlp(inputs, groups, group_kernel, product_kernel, kernels,
                                      biases, **o)]
*first_grads, kernel_grads, bias_grads = lib.sim_merlin_sigmoid_mlp_grad(
    inputs, groups, group_kernel, product_kernel, kernels, biases, d_out, **o)
results += [*first_grads, *kernel_grads, *bias_grads]
# widths of more than one 32-column block, not whole blocks: C's partial last column block goes
# through the tile kernel's edge buffer (outputs 24-34)
kernels, biases = [f(11, 100), f(100, 50), f(50, 1)], [f(100), f(50), f(1)]
group_kernel, product_kernel = f(11, 100), f(11, 100)
results.append(lib.sim_merlin_sigmoid_mlp(inputs, groups, group_kernel, product_kernel, kernels,
                                          biases, **o))
*first_grads, kernel_grads, bias_grads = lib.sim_merlin_sigmoid_mlp_grad(
    inputs, groups, group_kernel, product_kernel, kernels, biases, d_out, **o)
results += [*first_grads, *kernel_grads, *bias_grads]
np.savez(sys.argv[1], *[r.numpy() for r in results])
"""


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX (the AVX512-BF16 path is tested)")
def test_amx_and_avx512_products_agree(tmp_path):
    script = tmp_path / "products.py"
    script.write_text(SCRIPT)
    outputs = {}
    for amx in ("1", "0"):
        target = tmp_path / f"amx{amx}.npz"
        result = subprocess.run([sys.executable, str(script), str(target)], capture_output=True,
                                text=True, timeout=300,
                                env={**os.environ, "SIM_MERLIN_KERNEL_AMX": amx})
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[amx] = np.load(target)
    names = outputs["1"].files
    assert len(names) == 35
    # The tile path really ran: its sums are ordered differently, so some bits differ.
    assert any(not np.array_equal(outputs["1"][n], outputs["0"][n]) for n in names)
    for name in names:
        amx, avx = outputs["1"][name], outputs["0"][name]
        assert amx.shape == avx.shape and np.isfinite(amx).all()
        # The sums' order differs; a value rounded to bfloat16 for a later product may then
        # round the other way (2**-8 of one term): a few elements differ by ~1e-5.
        # (the wide MLP's outputs, 24 on, have sums of 100 terms: 1e-3)
        wide = int(name.split("_")[1]) >= 24
        np.testing.assert_allclose(amx, avx, rtol=1e-3, atol=1e-3 if wide else 1e-4,
                                   err_msg=name)
        assert np.abs(amx - avx).mean() < 1e-6 * max(1.0, np.abs(avx).mean()) * 10
