// Dot-product softmax attention of a target over a behaviour sequence, as one op
// (sim_merlin.kernels).
//
// For each sample b, with query q [D], keys k [L, D] and mask m [L]:
//   s_t = <k_t, q>;  w = softmax of s over the steps where m_t holds (0 elsewhere, and 0 on a
//   row with no such step);  pooled = sum_t w_t k_t.
// In TensorFlow ops that is two batched matrix-vector products, a select, a softmax and a select
// forward, and backward twice as many ops plus the sum of the keys' two gradients, each a pass
// over [B, L, D] (the reference's DIN attention and SIM's exact search unit). Here one pass per
// sample with its keys in cache. The gradient kernel recomputes w and returns
//   g_t = <dpooled, k_t> + dweights_t;  ds_t = w_t (g_t - sum_u w_u g_u);
//   dq = sum_t ds_t k_t;  dk_t = w_t dpooled + ds_t q.
// The arithmetic is float32; bfloat16 inputs are widened exactly, outputs rounded to nearest even
// (rows.h), so scores and weights are not rounded to bfloat16 between the steps as TensorFlow's
// ops under mixed_bfloat16 round them.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "Eigen/Core"
#include "rows.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

using sim_merlin::Bfloat16;
using sim_merlin::InputRows;
using sim_merlin::OutputRows;
using sim_merlin::StoreRows;

using Keys = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic,
                                            Eigen::RowMajor>>;
using KeysOut = Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
using Vector = Eigen::Map<Eigen::VectorXf>;
using ConstVector = Eigen::Map<const Eigen::VectorXf>;

constexpr int64_t kSamplesPerBlock = 32;  // a block's keys (32 x 100 x 32 floats) stay in L2

REGISTER_OP("SimMerlinDotAttention")
    .Attr("T: {float, bfloat16}")
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("query: T")         // [B, D]
    .Input("keys: T")          // [B, L, D]
    .Input("mask: bool")       // [B, L]
    .Output("pooled: T")       // [B, D]
    .Output("weights: T")      // [B, L]
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle query, keys, mask;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &query));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &keys));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &mask));
      DimensionHandle batch, length, dim;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(query, 0), c->Dim(keys, 0), &batch));
      TF_RETURN_IF_ERROR(c->Merge(batch, c->Dim(mask, 0), &batch));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(keys, 1), c->Dim(mask, 1), &length));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(query, 1), c->Dim(keys, 2), &dim));
      c->set_output(0, c->Matrix(batch, dim));
      c->set_output(1, c->Matrix(batch, length));
      return Status();
    });

REGISTER_OP("SimMerlinDotAttentionGrad")
    .Attr("T: {float, bfloat16}")
    .Attr("threads: int = 0")
    .Input("query: T")
    .Input("keys: T")
    .Input("mask: bool")
    .Input("pooled_grad: T")   // [B, D]
    .Input("weights_grad: T")  // [B, L]
    .Output("query_grad: T")   // [B, D]
    .Output("keys_grad: T")    // [B, L, D]
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      return Status();
    });

// The softmax weights w [L] of one sample from its scores s [L] (overwritten) and mask.
inline void MaskedSoftmax(const bool* mask, int64_t length, float* scores) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < length; ++t) {
    if (mask[t]) top = std::max(top, scores[t]);
  }
  Vector values(scores, length);
  values = (values.array() - top).exp();  // vectorised; padding is zeroed next, not multiplied
  float total = 0.0f;
  for (int64_t t = 0; t < length; ++t) {
    if (!mask[t]) scores[t] = 0.0f;
    total += scores[t];
  }
  if (total > 0.0f) values *= 1.0f / total;
}

struct Sizes {
  int64_t batch = 0, length = 0, dim = 0;
};

// Checks the shapes of query, keys and mask (inputs 0, 1, 2).
inline Status ReadSizes(OpKernelContext* context, Sizes* sizes) {
  const Tensor& query = context->input(0);
  const Tensor& keys = context->input(1);
  const Tensor& mask = context->input(2);
  if (query.dims() != 2 || keys.dims() != 3 || mask.dims() != 2) {
    return tensorflow::errors::InvalidArgument(
        "dot attention takes query [B, D], keys [B, L, D], mask [B, L]; got ",
        query.shape().DebugString(), ", ", keys.shape().DebugString(), ", ",
        mask.shape().DebugString());
  }
  sizes->batch = keys.dim_size(0);
  sizes->length = keys.dim_size(1);
  sizes->dim = keys.dim_size(2);
  if (query.dim_size(0) != sizes->batch || query.dim_size(1) != sizes->dim ||
      mask.dim_size(0) != sizes->batch || mask.dim_size(1) != sizes->length) {
    return tensorflow::errors::InvalidArgument(
        "dot attention: query ", query.shape().DebugString(), " and mask ",
        mask.shape().DebugString(), " do not match keys ", keys.shape().DebugString());
  }
  return Status();
}

template <typename T>
class DotAttentionOp : public tensorflow::OpKernel {
 public:
  explicit DotAttentionOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
  }

  void Compute(OpKernelContext* context) override {
    Sizes n;
    OP_REQUIRES_OK(context, ReadSizes(context, &n));
    Tensor* pooled = nullptr;
    Tensor* weights = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({n.batch, n.dim}), &pooled));
    OP_REQUIRES_OK(context,
                   context->allocate_output(1, TensorShape({n.batch, n.length}), &weights));
    const T* query = context->input(0).flat<T>().data();
    const T* keys = context->input(1).flat<T>().data();
    const bool* mask = context->input(2).flat<bool>().data();
    T* pooled_out = pooled->flat<T>().data();
    T* weights_out = weights->flat<T>().data();
    const int64_t per_sample = n.length * n.dim;
    sim_merlin::ForEachRowBlock(
        context, threads_, n.batch, kSamplesPerBlock, 6 * per_sample,
        [&](int64_t begin, int64_t end) {
          const int64_t rows = end - begin;
          std::vector<float> key_buffer, query_buffer, pooled_buffer, weight_buffer;
          const float* k = InputRows(keys + begin * per_sample, rows * per_sample, &key_buffer);
          const float* q = InputRows(query + begin * n.dim, rows * n.dim, &query_buffer);
          float* p = OutputRows(pooled_out + begin * n.dim, rows * n.dim, &pooled_buffer);
          float* w = OutputRows(weights_out + begin * n.length, rows * n.length, &weight_buffer);
          for (int64_t r = 0; r < rows; ++r) {
            const Keys key(k + r * per_sample, n.length, n.dim);
            const bool* valid = mask + (begin + r) * n.length;
            Vector weight(w + r * n.length, n.length);
            weight.noalias() = key * ConstVector(q + r * n.dim, n.dim);
            MaskedSoftmax(valid, n.length, weight.data());
            Vector(p + r * n.dim, n.dim).noalias() = key.transpose() * weight;
          }
          StoreRows(p, rows * n.dim, pooled_out + begin * n.dim);
          StoreRows(w, rows * n.length, weights_out + begin * n.length);
        });
  }

 private:
  int threads_ = 0;
};

template <typename T>
class DotAttentionGradOp : public tensorflow::OpKernel {
 public:
  explicit DotAttentionGradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
  }

  void Compute(OpKernelContext* context) override {
    Sizes n;
    OP_REQUIRES_OK(context, ReadSizes(context, &n));
    const Tensor& pooled_grad = context->input(3);
    const Tensor& weights_grad = context->input(4);
    OP_REQUIRES(context,
                pooled_grad.shape() == TensorShape({n.batch, n.dim}) &&
                    weights_grad.shape() == TensorShape({n.batch, n.length}),
                tensorflow::errors::InvalidArgument(
                    "dot attention gradient: pooled_grad ", pooled_grad.shape().DebugString(),
                    " / weights_grad ", weights_grad.shape().DebugString(),
                    " do not match the outputs' shapes"));
    Tensor* query_grad = nullptr;
    Tensor* keys_grad = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(0).shape(), &query_grad));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(1).shape(), &keys_grad));
    const T* query = context->input(0).flat<T>().data();
    const T* keys = context->input(1).flat<T>().data();
    const bool* mask = context->input(2).flat<bool>().data();
    const T* dpooled = pooled_grad.flat<T>().data();
    const T* dweights = weights_grad.flat<T>().data();
    T* dquery_out = query_grad->flat<T>().data();
    T* dkeys_out = keys_grad->flat<T>().data();
    const int64_t per_sample = n.length * n.dim;
    sim_merlin::ForEachRowBlock(
        context, threads_, n.batch, kSamplesPerBlock, 12 * per_sample,
        [&](int64_t begin, int64_t end) {
          const int64_t rows = end - begin;
          std::vector<float> key_buffer, query_buffer, dp_buffer, dw_buffer, dq_buffer,
              dk_buffer, w(n.length), g(n.length);
          const float* k = InputRows(keys + begin * per_sample, rows * per_sample, &key_buffer);
          const float* q = InputRows(query + begin * n.dim, rows * n.dim, &query_buffer);
          const float* dp = InputRows(dpooled + begin * n.dim, rows * n.dim, &dp_buffer);
          const float* dw = InputRows(dweights + begin * n.length, rows * n.length, &dw_buffer);
          float* dq = OutputRows(dquery_out + begin * n.dim, rows * n.dim, &dq_buffer);
          float* dk = OutputRows(dkeys_out + begin * per_sample, rows * per_sample, &dk_buffer);
          for (int64_t r = 0; r < rows; ++r) {
            const Keys key(k + r * per_sample, n.length, n.dim);
            const ConstVector query_row(q + r * n.dim, n.dim);
            const ConstVector dp_row(dp + r * n.dim, n.dim);
            const bool* valid = mask + (begin + r) * n.length;
            Vector weight(w.data(), n.length), grad(g.data(), n.length);
            weight.noalias() = key * query_row;
            MaskedSoftmax(valid, n.length, w.data());
            grad.noalias() = key * dp_row;
            grad += ConstVector(dw + r * n.length, n.length);
            float mean = 0.0f;
            for (int64_t t = 0; t < n.length; ++t) mean += w[t] * g[t];
            for (int64_t t = 0; t < n.length; ++t) g[t] = valid[t] ? w[t] * (g[t] - mean) : 0.0f;
            Vector(dq + r * n.dim, n.dim).noalias() = key.transpose() * grad;
            KeysOut dkey(dk + r * per_sample, n.length, n.dim);
            dkey.noalias() = weight * dp_row.transpose();
            dkey.noalias() += grad * query_row.transpose();
          }
          StoreRows(dq, rows * n.dim, dquery_out + begin * n.dim);
          StoreRows(dk, rows * per_sample, dkeys_out + begin * per_sample);
        });
  }

 private:
  int threads_ = 0;
};

#define REGISTER(T)                                                                            \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("SimMerlinDotAttention").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),     \
      DotAttentionOp<T>);                                                                      \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("SimMerlinDotAttentionGrad").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      DotAttentionGradOp<T>);
REGISTER(float)
REGISTER(Bfloat16)
#undef REGISTER

}  // namespace
