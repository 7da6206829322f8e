// What the ops that read or update TensorFlow variables share (sim_merlin.kernels: adam.cc,
// deferred_adam.cc, embedding_rows.cc): TensorFlow's kernel and resource-variable headers, the
// row-parallel helper, and the names they use. Included by .cc files only: the names are in the
// including file's anonymous namespace.

#pragma once

#ifndef EIGEN_USE_THREADS
#define EIGEN_USE_THREADS
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/kernels/training_op_helpers.h"
#include "parallel.h"

#include <sys/mman.h>

#include <cstdint>
#include <mutex>
#include <unordered_set>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 6.1+; older kernels refuse it (EINVAL), which is harmless
#endif

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using CPUDevice = Eigen::ThreadPoolDevice;

// The tensor of variable input `input`, to be updated in place; the caller holds the variable's
// mutex exclusively (MaybeLockVariableInputMutexesInOrder with do_lock). TensorFlow's dense
// update path (GetInputTensorFromVariable, sparse=false) copies the whole tensor whenever the
// variable is in copy-on-read mode, which every gather (and SimMerlinEmbeddingRows) puts an
// embedding table in: a copy of the table at every step. In that mode no read keeps a
// reference to the buffer (dense reads copy it under the lock), so the copy is needed only when
// the buffer is shared, as for any variable: TensorFlow's copy when its reference count is not one.
template <typename T>
tensorflow::Status UpdatableVariable(OpKernelContext* context, int input, Tensor* out) {
  tensorflow::core::RefCountPtr<tensorflow::Var> var;
  TF_RETURN_IF_ERROR(tensorflow::LookupResource(
      context, tensorflow::HandleFromInput(context, input), &var));
  TF_RETURN_IF_ERROR(tensorflow::PrepareToUpdateVariable<CPUDevice, T>(
      context, var->tensor(), /*copy_on_read_mode=*/false));
  *out = *var->tensor();
  return tensorflow::Status();
}

// Asks Linux to back a large table's buffer with 2 MiB pages, once per buffer. Embedding rows
// and their Adam moments are read and written at random rows of tables far larger than the TLB's
// reach with 4 KiB pages: every row then costs a page walk. MADV_HUGEPAGE makes the range
// eligible (transparent huge pages in "madvise" mode), MADV_COLLAPSE converts what is already
// mapped now. Advice only: a kernel without it or a refusal changes nothing but speed.
inline void AdviseHugePages(const void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 4 * kHuge) return;
  static std::mutex mutex;
  static std::unordered_set<const void*> seen;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (!seen.insert(data).second) return;
  }
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end <= begin) return;
  void* start = reinterpret_cast<void*>(begin);
  madvise(start, end - begin, MADV_HUGEPAGE);
  madvise(start, end - begin, MADV_COLLAPSE);
}

}  // namespace
