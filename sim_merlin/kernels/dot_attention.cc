// Dot-product attention reads of a behaviour sequence, as one op each way (sim_merlin.kernels).
//
// For each sample b, with query q [D], keys k [L, D] and H masks m_h [L] (a "head" each):
//   s_t = <k_t, q>;  w_h = softmax of s over the steps where m_h holds (0 elsewhere, and 0 on
//   a row with no such step) when normalize[h], else w_h = m_h as 0/1 weights (a masked sum);
//   read_h = sum_t w_h,t k_t.
// DIN's and SIM's exact search unit's attention (H = 1), and SIM's three reads of its long
// history (stage one's attention over the valid steps, the ESU's over the selected ones, the sum
// of the selected ones). In TensorFlow ops each step of it is a pass over the [B, L, D] keys and
// the keys' gradient is a sum of several; here one pass per sample with its keys in cache. The
// gradient kernel recomputes the weights and returns, with g_h = k dread_h + dweights_h,
//   ds = sum over normalized heads of w_h (g_h - <w_h, g_h>);
//   dq = sum_t ds_t k_t;  dk_t = sum_h w_h,t dread_h + ds_t q.
// (The weights of a masked-sum head are constants: its dweights has no effect.) The arithmetic
// is float32; bfloat16 inputs are widened exactly, outputs rounded to nearest even (rows.h), so
// scores and weights are not rounded to bfloat16 between the steps as TensorFlow's ops under
// mixed_bfloat16 round them.

#include <algorithm>
#include <cmath>
#include <cstring>
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

using Keys = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic,
                                            Eigen::RowMajor>>;
using KeysOut = Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
using ConstRows = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic,
                                                 Eigen::RowMajor>>;  // [H, L] or [H, D]
using Vector = Eigen::Map<Eigen::VectorXf>;
using ConstVector = Eigen::Map<const Eigen::VectorXf>;

constexpr int64_t kSamplesPerBlock = 32;  // a block's keys (32 x 100 x 32 floats) stay in L2

REGISTER_OP("SimMerlinDotAttention")
    .Attr("T: {float, bfloat16}")
    .Attr("normalize: list(bool) >= 1")  // per head: softmax weights, or the mask as weights
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("query: T")         // [B, D]
    .Input("keys: T")          // [B, L, D]
    .Input("masks: bool")      // [B, H, L]
    .Output("reads: T")        // [B, H, D]
    .Output("weights: T")      // [B, H, L]
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle query, keys, masks;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &query));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &keys));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 3, &masks));
      std::vector<bool> normalize;
      TF_RETURN_IF_ERROR(c->GetAttr("normalize", &normalize));
      DimensionHandle batch, heads, length, dim;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(query, 0), c->Dim(keys, 0), &batch));
      TF_RETURN_IF_ERROR(c->Merge(batch, c->Dim(masks, 0), &batch));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(masks, 1),
                                  c->MakeDim(static_cast<int64_t>(normalize.size())), &heads));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(keys, 1), c->Dim(masks, 2), &length));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(query, 1), c->Dim(keys, 2), &dim));
      c->set_output(0, c->MakeShape({batch, heads, dim}));
      c->set_output(1, c->MakeShape({batch, heads, length}));
      return Status();
    });

REGISTER_OP("SimMerlinDotAttentionGrad")
    .Attr("T: {float, bfloat16}")
    .Attr("normalize: list(bool) >= 1")
    .Attr("threads: int = 0")
    .Input("query: T")
    .Input("keys: T")
    .Input("masks: bool")
    .Input("reads_grad: T")    // [B, H, D]
    .Input("weights_grad: T")  // [B, H, L]
    .Output("query_grad: T")   // [B, D]
    .Output("keys_grad: T")    // [B, L, D]
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      return Status();
    });

using Floats = Eigen::Map<Eigen::ArrayXf>;
using ConstFloats = Eigen::Map<const Eigen::ArrayXf>;

// A mask [L] as 0/1 floats (masks are random-looking, e.g. a search's selection: branches on
// them would be mispredicted; these loops have none).
inline void MaskFloats(const bool* mask, int64_t length, float* out) {
  for (int64_t t = 0; t < length; ++t) out[t] = static_cast<float>(mask[t]);
}

// The softmax over the steps where `mask` [L] (0/1) is 1 of `scores` [L], into `weights`:
// 0 elsewhere, and everywhere when no step is.
inline void MaskedSoftmax(const float* mask, const float* scores, int64_t length,
                          float* weights) {
  const ConstFloats valid(mask, length), score(scores, length);
  const float lowest = -std::numeric_limits<float>::infinity();
  const float top = (valid > 0.0f).select(score, lowest).maxCoeff();
  Floats w(weights, length);
  // exp(score - top) also runs on the padded steps (where it may overflow): selected away.
  w = (valid > 0.0f).select((score - top).exp(), 0.0f);
  const float total = w.sum();
  if (total > 0.0f) w *= 1.0f / total;
}

struct Sizes {
  int64_t batch = 0, heads = 0, length = 0, dim = 0;
};

// Checks the shapes of query, keys and masks (inputs 0, 1, 2) against the heads' count.
inline Status ReadSizes(OpKernelContext* context, int64_t heads, Sizes* sizes) {
  const Tensor& query = context->input(0);
  const Tensor& keys = context->input(1);
  const Tensor& masks = context->input(2);
  if (query.dims() != 2 || keys.dims() != 3 || masks.dims() != 3) {
    return tensorflow::errors::InvalidArgument(
        "dot attention takes query [B, D], keys [B, L, D], masks [B, H, L]; got ",
        query.shape().DebugString(), ", ", keys.shape().DebugString(), ", ",
        masks.shape().DebugString());
  }
  sizes->batch = keys.dim_size(0);
  sizes->heads = heads;
  sizes->length = keys.dim_size(1);
  sizes->dim = keys.dim_size(2);
  if (query.dim_size(0) != sizes->batch || query.dim_size(1) != sizes->dim ||
      masks.dim_size(0) != sizes->batch || masks.dim_size(1) != heads ||
      masks.dim_size(2) != sizes->length) {
    return tensorflow::errors::InvalidArgument(
        "dot attention: query ", query.shape().DebugString(), " and masks ",
        masks.shape().DebugString(), " do not match keys ", keys.shape().DebugString(),
        " and ", heads, " heads");
  }
  return Status();
}

// The weights [L] of one head of one sample from its scores [L] and mask [L] (0/1).
inline void HeadWeights(bool normalize, const float* scores, const float* mask,
                        int64_t length, float* weights) {
  if (normalize) {
    MaskedSoftmax(mask, scores, length, weights);
  } else {
    std::copy(mask, mask + length, weights);
  }
}

// The attributes both kernels read.
class DotAttentionKernel : public tensorflow::OpKernel {
 public:
  explicit DotAttentionKernel(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
    OP_REQUIRES_OK(context, context->GetAttr("normalize", &normalize_));
  }

 protected:
  int threads_ = 0;
  std::vector<bool> normalize_;
};

// One sample's values as float32 in `buffer` (allocated once per block by Eigen, aligned): the
// kernels' sums then never depend on where a sample sits in memory (Eigen's vectorised sums
// start differently at different alignments), so a sample's results are the same in any batch
// and any block. One sample's keys at a time stay in L1, where a block's would not.
inline const float* Sample(const float* source, int64_t count, Eigen::VectorXf* buffer) {
  std::memcpy(buffer->data(), source, count * sizeof(float));
  return buffer->data();
}
inline const float* Sample(const Bfloat16* source, int64_t count, Eigen::VectorXf* buffer) {
  sim_merlin::ToFloat(source, count, buffer->data());
  return buffer->data();
}
inline void Store(const Eigen::VectorXf& values, float* target) {
  std::memcpy(target, values.data(), values.size() * sizeof(float));
}
inline void Store(const Eigen::VectorXf& values, Bfloat16* target) {
  sim_merlin::ToBfloat16(values.data(), values.size(), target);
}

#if defined(__AVX512F__)
// C for the one-softmax-head AVX-512 kernels below (D = 16 * C, C = 1..4), 0 when they do not
// apply (several heads, a masked sum, another width).
inline int OneHeadChunks(const Sizes& n, const std::vector<bool>& normalize) {
  const bool fits = n.heads == 1 && normalize[0] && n.dim % 16 == 0 && 16 <= n.dim &&
                    n.dim <= 64;
  return fits ? static_cast<int>(n.dim / 16) : 0;
}

// One softmax head (H = 1) of one sample with D = 16 * C, its keys widened to float32 in
// `keys` [L, D]: each row's score in registers, then the weighted sum of the rows, where the
// general path below makes two matrix-vector passes through Eigen (the same formulas, sums in
// another order).
template <int C, typename T>
void SingleHeadForward(const float* keys, const float* q, const bool* mask_in, int64_t length,
                       float* scratch, T* read_out, T* weights_out) {
  constexpr int D = 16 * C;
  float* scores = scratch;
  float* mask = scores + length;
  float* w = mask + length;
  __m512 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  for (int64_t t = 0; t < length; ++t) {
    const float* k = keys + t * D;
    __m512 s = _mm512_mul_ps(_mm512_loadu_ps(k), qv[0]);
    for (int c = 1; c < C; ++c) s = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * c), qv[c], s);
    scores[t] = _mm512_reduce_add_ps(s);
  }
  MaskFloats(mask_in, length, mask);
  MaskedSoftmax(mask, scores, length, w);
  __m512 read[C];
  for (int c = 0; c < C; ++c) read[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; ++t) {
    const __m512 wt = _mm512_set1_ps(w[t]);
    for (int c = 0; c < C; ++c) {
      read[c] = _mm512_fmadd_ps(wt, _mm512_loadu_ps(keys + t * D + 16 * c), read[c]);
    }
  }
  alignas(64) float read_rows[D];
  for (int c = 0; c < C; ++c) _mm512_store_ps(read_rows + 16 * c, read[c]);
  sim_merlin::Narrow(read_rows, D, read_out);
  sim_merlin::Narrow(w, length, weights_out);
}

// The gradient of one softmax head (H = 1) of one sample with D = 16 * C, its keys widened to
// float32 in `keys` [L, D]: two passes over the keys, each row's products in registers, and
// dk written once, where the general path below makes five matrix-vector passes and writes dk
// twice. The same formulas; sums in another order (so equal to the general path up to float
// rounding), and the same for a sample wherever it sits in a batch.
template <int C, typename T>
void SingleHeadGradient(const float* keys, const float* q, const float* dr, const float* dw,
                        const bool* mask_in, int64_t length, float* scratch, T* dq_out,
                        T* dk_out) {
  constexpr int D = 16 * C;
  float* scores = scratch;
  float* grad = scores + length;
  float* mask = grad + length;
  float* w = mask + length;
  __m512 qv[C], dv[C];
  for (int c = 0; c < C; ++c) {
    qv[c] = _mm512_loadu_ps(q + 16 * c);
    dv[c] = _mm512_loadu_ps(dr + 16 * c);
  }
  for (int64_t t = 0; t < length; ++t) {
    const float* k = keys + t * D;
    __m512 s = _mm512_mul_ps(_mm512_loadu_ps(k), qv[0]);
    __m512 g = _mm512_mul_ps(_mm512_loadu_ps(k), dv[0]);
    for (int c = 1; c < C; ++c) {
      s = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * c), qv[c], s);
      g = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * c), dv[c], g);
    }
    scores[t] = _mm512_reduce_add_ps(s);
    grad[t] = _mm512_reduce_add_ps(g) + dw[t];
  }
  MaskFloats(mask_in, length, mask);
  MaskedSoftmax(mask, scores, length, w);
  float mean = 0.0f;
  for (int64_t t = 0; t < length; ++t) mean += w[t] * grad[t];
  __m512 dq[C];
  for (int c = 0; c < C; ++c) dq[c] = _mm512_setzero_ps();
  alignas(64) float dk[D];
  for (int64_t t = 0; t < length; ++t) {
    const float* k = keys + t * D;
    const float score_grad = w[t] * (grad[t] - mean);  // 0 off the mask: w is exactly 0 there
    const __m512 sg = _mm512_set1_ps(score_grad), wt = _mm512_set1_ps(w[t]);
    for (int c = 0; c < C; ++c) {
      dq[c] = _mm512_fmadd_ps(sg, _mm512_loadu_ps(k + 16 * c), dq[c]);
      _mm512_store_ps(dk + 16 * c, _mm512_fmadd_ps(sg, qv[c], _mm512_mul_ps(wt, dv[c])));
    }
    sim_merlin::Narrow(dk, D, dk_out + t * D);
  }
  alignas(64) float dq_rows[D];
  for (int c = 0; c < C; ++c) _mm512_store_ps(dq_rows + 16 * c, dq[c]);
  sim_merlin::Narrow(dq_rows, D, dq_out);
}
#endif

template <typename T>
class DotAttentionOp : public DotAttentionKernel {
 public:
  using DotAttentionKernel::DotAttentionKernel;

  void Compute(OpKernelContext* context) override {
    Sizes n;
    OP_REQUIRES_OK(context, ReadSizes(context, normalize_.size(), &n));
    Tensor* reads = nullptr;
    Tensor* weights = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({n.batch, n.heads, n.dim}),
                                                     &reads));
    OP_REQUIRES_OK(context, context->allocate_output(
                                1, TensorShape({n.batch, n.heads, n.length}), &weights));
    const T* query = context->input(0).flat<T>().data();
    const T* keys = context->input(1).flat<T>().data();
    const bool* masks = context->input(2).flat<bool>().data();
    T* reads_out = reads->flat<T>().data();
    T* weights_out = weights->flat<T>().data();
    const int64_t per_sample = n.length * n.dim, reads_size = n.heads * n.dim,
                  weights_size = n.heads * n.length;
#if defined(__AVX512F__)
    if (const int chunks = OneHeadChunks(n, normalize_)) {
      static constexpr decltype(&SingleHeadForward<1, T>) kByChunks[] = {
          &SingleHeadForward<1, T>, &SingleHeadForward<2, T>, &SingleHeadForward<3, T>,
          &SingleHeadForward<4, T>};
      const auto single = kByChunks[chunks - 1];
      sim_merlin::ForEachRowBlock(
          context, threads_, n.batch, kSamplesPerBlock, 3 * per_sample,
          [&](int64_t begin, int64_t end) {
            Eigen::VectorXf key_buffer(per_sample), query_buffer(n.dim), scratch(3 * n.length);
            for (int64_t b = begin; b < end; ++b) {
              single(Sample(keys + b * per_sample, per_sample, &key_buffer),
                     Sample(query + b * n.dim, n.dim, &query_buffer), masks + b * n.length,
                     n.length, scratch.data(), reads_out + b * n.dim,
                     weights_out + b * n.length);
            }
          });
      return;
    }
#endif
    sim_merlin::ForEachRowBlock(
        context, threads_, n.batch, kSamplesPerBlock, (2 + 2 * n.heads) * per_sample,
        [&](int64_t begin, int64_t end) {
          Eigen::VectorXf key_buffer(per_sample), query_buffer(n.dim), scores(n.length),
              mask(n.length), w(weights_size), read(reads_size);
          for (int64_t b = begin; b < end; ++b) {
            const Keys key(Sample(keys + b * per_sample, per_sample, &key_buffer), n.length,
                           n.dim);
            scores.noalias() = key * ConstVector(Sample(query + b * n.dim, n.dim, &query_buffer),
                                                 n.dim);
            for (int64_t h = 0; h < n.heads; ++h) {
              MaskFloats(masks + (b * n.heads + h) * n.length, n.length, mask.data());
              float* wh = w.data() + h * n.length;
              HeadWeights(normalize_[h], scores.data(), mask.data(), n.length, wh);
              Vector(read.data() + h * n.dim, n.dim).noalias() =
                  key.transpose() * ConstVector(wh, n.length);
            }
            Store(read, reads_out + b * reads_size);
            Store(w, weights_out + b * weights_size);
          }
        });
  }
};

template <typename T>
class DotAttentionGradOp : public DotAttentionKernel {
 public:
  using DotAttentionKernel::DotAttentionKernel;

  void Compute(OpKernelContext* context) override {
    Sizes n;
    OP_REQUIRES_OK(context, ReadSizes(context, normalize_.size(), &n));
    const Tensor& reads_grad = context->input(3);
    const Tensor& weights_grad = context->input(4);
    OP_REQUIRES(context,
                reads_grad.shape() == TensorShape({n.batch, n.heads, n.dim}) &&
                    weights_grad.shape() == TensorShape({n.batch, n.heads, n.length}),
                tensorflow::errors::InvalidArgument(
                    "dot attention gradient: reads_grad ", reads_grad.shape().DebugString(),
                    " / weights_grad ", weights_grad.shape().DebugString(),
                    " do not match the outputs' shapes"));
    Tensor* query_grad = nullptr;
    Tensor* keys_grad = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(0).shape(), &query_grad));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(1).shape(), &keys_grad));
    const T* query = context->input(0).flat<T>().data();
    const T* keys = context->input(1).flat<T>().data();
    const bool* masks = context->input(2).flat<bool>().data();
    const T* dreads = reads_grad.flat<T>().data();
    const T* dweights = weights_grad.flat<T>().data();
    T* dquery_out = query_grad->flat<T>().data();
    T* dkeys_out = keys_grad->flat<T>().data();
    const int64_t per_sample = n.length * n.dim, reads_size = n.heads * n.dim,
                  weights_size = n.heads * n.length;
#if defined(__AVX512F__)
    if (const int chunks = OneHeadChunks(n, normalize_)) {
      static constexpr decltype(&SingleHeadGradient<1, T>) kByChunks[] = {
          &SingleHeadGradient<1, T>, &SingleHeadGradient<2, T>, &SingleHeadGradient<3, T>,
          &SingleHeadGradient<4, T>};
      const auto single = kByChunks[chunks - 1];
      sim_merlin::ForEachRowBlock(
          context, threads_, n.batch, kSamplesPerBlock, 6 * per_sample,
          [&](int64_t begin, int64_t end) {
            Eigen::VectorXf key_buffer(per_sample), query_buffer(n.dim), dr_buffer(n.dim),
                dw_buffer(n.length), scratch(4 * n.length);
            for (int64_t b = begin; b < end; ++b) {
              single(Sample(keys + b * per_sample, per_sample, &key_buffer),
                     Sample(query + b * n.dim, n.dim, &query_buffer),
                     Sample(dreads + b * n.dim, n.dim, &dr_buffer),
                     Sample(dweights + b * n.length, n.length, &dw_buffer),
                     masks + b * n.length, n.length, scratch.data(), dquery_out + b * n.dim,
                     dkeys_out + b * per_sample);
            }
          });
      return;
    }
#endif
    sim_merlin::ForEachRowBlock(
        context, threads_, n.batch, kSamplesPerBlock, (4 + 4 * n.heads) * per_sample,
        [&](int64_t begin, int64_t end) {
          Eigen::VectorXf key_buffer(per_sample), query_buffer(n.dim), dr_buffer(reads_size),
              dw_buffer(weights_size), scores(n.length), w(weights_size), grad(n.length),
              score_grad(n.length), mask(n.length), dq(n.dim), dk(per_sample);
          for (int64_t b = begin; b < end; ++b) {
            const Keys key(Sample(keys + b * per_sample, per_sample, &key_buffer), n.length,
                           n.dim);
            const ConstVector query_row(Sample(query + b * n.dim, n.dim, &query_buffer), n.dim);
            const float* dr = Sample(dreads + b * reads_size, reads_size, &dr_buffer);
            const float* dw = Sample(dweights + b * weights_size, weights_size, &dw_buffer);
            scores.noalias() = key * query_row;
            score_grad.setZero();
            for (int64_t h = 0; h < n.heads; ++h) {
              MaskFloats(masks + (b * n.heads + h) * n.length, n.length, mask.data());
              float* wh = w.data() + h * n.length;
              HeadWeights(normalize_[h], scores.data(), mask.data(), n.length, wh);
              if (!normalize_[h]) continue;
              grad.noalias() = key * ConstVector(dr + h * n.dim, n.dim);
              grad += ConstVector(dw + h * n.length, n.length);
              // w is exactly 0 off the mask: those steps get no score gradient.
              const ConstFloats weight(wh, n.length);
              const float mean = (weight * grad.array()).sum();
              score_grad.array() += weight * (grad.array() - mean);
            }
            dq.noalias() = key.transpose() * score_grad;
            KeysOut dkey(dk.data(), n.length, n.dim);
            dkey.noalias() = ConstRows(w.data(), n.heads, n.length).transpose() *
                             ConstRows(dr, n.heads, n.dim);
            dkey.noalias() += score_grad * query_row.transpose();
            Store(dq, dquery_out + b * n.dim);
            Store(dk, dkeys_out + b * per_sample);
          }
        });
  }
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
