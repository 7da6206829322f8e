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

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using CPUDevice = Eigen::ThreadPoolDevice;

}  // namespace
