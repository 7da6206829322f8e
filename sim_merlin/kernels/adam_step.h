// One Adam step of an embedding row, shared by the optimizer kernels (adam.cc, deferred_adam.cc).
//
// Both files are compiled with -ffp-contract=off and -fno-math-errno (build.py): no FMA, so each
// element takes the float operations of TensorFlow's Adam kernels, and a square root that may not
// set errno, so the loop vectorizes.

#pragma once

#include <cmath>
#include <cstdint>

namespace sim_merlin {

// One Adam step of a row of `width` floats with gradient g. A function of its own, with the
// scalars as values: in the update's loop they were references captured by a lambda, which the
// compiler had to reload after every store (they might alias the rows), so the loop ran one
// element at a time (a square root and a division each) instead of 16 to a register. The same
// float operations on each element either way (no FMA: -ffp-contract=off).
inline void ApplyStep(float* __restrict w, float* __restrict m, float* __restrict v,
                      const float* __restrict g, int64_t width, float alpha,
                      float one_minus_beta1, float one_minus_beta2, float epsilon) {
  for (int64_t j = 0; j < width; ++j) {
    m[j] += (g[j] - m[j]) * one_minus_beta1;
    v[j] += (g[j] * g[j] - v[j]) * one_minus_beta2;
    w[j] -= (m[j] * alpha) / (std::sqrt(v[j]) + epsilon);
  }
}

}  // namespace sim_merlin
