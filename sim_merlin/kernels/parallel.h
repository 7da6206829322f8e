// Running a kernel's independent pieces of work in parallel (sim_merlin.kernels).
//
// TensorFlow gives a kernel its intra-op thread pool. Training on a few cores is often fastest
// with one intra-op thread (many small ops then run side by side on the inter-op threads), but a
// fused kernel is one large op on the step's critical path: with `threads` > 1 and a one-thread
// pool, it splits its work over that many threads of its own. Those threads get the caller's
// floating-point control state (TensorFlow's threads flush denormals to zero; a new thread does
// not), so every row is computed alike whichever thread takes it.

#pragma once

#include <xmmintrin.h>

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/util/work_sharder.h"

namespace sim_merlin {

// Calls work(first, last) over disjoint ranges covering [0, count); cost_per_item in cycles.
template <typename Work>
void ParallelFor(tensorflow::OpKernelContext* context, int64_t count, int64_t cost_per_item,
                 int threads, Work work) {
  if (count <= 0) return;
  auto* pool = context->device()->tensorflow_cpu_worker_threads();
  const int64_t own = std::min<int64_t>(threads, count);
  if (own <= 1 || pool->num_threads > 1) {
    tensorflow::Shard(pool->num_threads, pool->workers, count, cost_per_item,
                      [&](int64_t first, int64_t last) { work(first, last); });
    return;
  }
  auto part = [&](int64_t k) { work(k * count / own, (k + 1) * count / own); };
  const unsigned int control = _mm_getcsr();
  std::vector<std::thread> helpers;
  helpers.reserve(own - 1);
  for (int64_t k = 1; k < own; ++k) {
    helpers.emplace_back([&part, control, k] {
      _mm_setcsr(control);
      part(k);
    });
  }
  part(0);
  for (auto& helper : helpers) helper.join();
}

}  // namespace sim_merlin
