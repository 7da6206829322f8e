// The k best positions of each row as a mask (sim_merlin.kernels): SIM's search unit.
//
// The GSU keeps the top_k behaviours of a long history by relevance; the ESU reads that choice as
// a mask over the history (it is order-free). In TensorFlow ops that is a sort (TopKV2 over the
// whole row), then a histogram of the picked positions (DenseBincount) and a logical and: this op
// marks each row's k best valid positions without sorting (SelectRow: each candidate's count of
// better candidates, by vector comparisons; a partial selection without AVX-512).
//
// SimMerlinTopKMask: selection[b, t] = valid[b, t] and t is among the k valid positions of row b
// with the highest keys (all valid positions when there are at most k). Equal keys rank by
// position, lower first; a NaN key ranks below every number.
//
// SimMerlinDotTopKMask: the same with soft search's keys computed in the op,
// keys[b, t] = <history[b, t], query[b]>: a float32 sum of the products (bfloat16 inputs are
// widened exactly) rounded to the inputs' dtype, as a product in that dtype rounds its output.
// It replaces a batched matrix-vector product (one tiny product per sample for oneDNN, slower
// than the selection itself) and the pass over its [B, L] output.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "parallel.h"
#include "rows.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

REGISTER_OP("SimMerlinTopKMask")
    .Attr("k: int >= 0")
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("keys: float")   // [B, L]
    .Input("valid: bool")   // [B, L]
    .Output("selection: bool")  // [B, L]
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle keys, valid, merged;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &keys));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &valid));
      TF_RETURN_IF_ERROR(c->Merge(keys, valid, &merged));
      c->set_output(0, merged);
      return Status();
    });

REGISTER_OP("SimMerlinDotTopKMask")
    .Attr("T: {float, bfloat16}")
    .Attr("k: int >= 0")
    .Attr("threads: int = 0")
    .Input("query: T")          // [B, D]
    .Input("history: T")        // [B, L, D]
    .Input("valid: bool")       // [B, L]
    .Output("selection: bool")  // [B, L]
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle history, valid, merged;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &history));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &valid));
      TF_RETURN_IF_ERROR(c->Merge(valid, c->Matrix(c->Dim(history, 0), c->Dim(history, 1)),
                                  &merged));
      c->set_output(0, merged);
      return Status();
    });

// A float key as an unsigned integer of the same order: a NaN below every number (-inf
// included), -0 equal to +0 (x + 0 is +0 for both).
inline uint32_t OrderedBits(float x) {
  const float key = x + 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &key, sizeof bits);
  const uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  const uint32_t ordered = bits ^ (negative | 0x80000000u);
  return std::isnan(x) ? 0u : ordered;
}

inline uint32_t PositionOf(uint64_t word) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(word & 0xFFFFFFFFu);
}

// One row: picked[t] = valid[t] and t among the k best valid positions. Each candidate is one
// 64-bit word, its key's ordered bits above its position's complement, so the words are distinct
// and a larger word is a better candidate (higher key, then lower position): a candidate is
// picked when fewer than k words are larger. With AVX-512 that count is branch-free, 8 words per
// comparison and 4 candidates at a time; else a partial sort. `words` holds at least
// length + 12 elements.
inline void SelectRow(const float* keys, const bool* valid, int64_t length, int64_t k,
                      uint64_t* words, bool* picked) {
  int64_t count = 0;
  for (int64_t t = 0; t < length; ++t) count += valid[t];
  if (count <= k) {
    std::copy_n(valid, length, picked);
    return;
  }
  std::fill_n(picked, length, false);
  if (k == 0) return;
  count = 0;
  for (int64_t t = 0; t < length; ++t) {
    words[count] = (static_cast<uint64_t>(OrderedBits(keys[t])) << 32) |
                   (0xFFFFFFFFu - static_cast<uint32_t>(t));
    count += valid[t];  // an invalid step's word is overwritten by the next one
  }
#if defined(__AVX512F__)
  // Zero words (below every candidate: positions are < 2^32 - 1) up to whole registers and
  // whole groups of 4 candidates.
  const int64_t padded = (count + 7) / 8 * 8;
  std::fill(words + count, words + std::max(padded, (count + 3) / 4 * 4), uint64_t{0});
  const __m512i one = _mm512_set1_epi64(1);
  for (int64_t i = 0; i < count; i += 4) {
    __m512i larger[4];
    __m512i candidate[4];
    for (int c = 0; c < 4; ++c) {
      larger[c] = _mm512_setzero_si512();
      candidate[c] = _mm512_set1_epi64(static_cast<int64_t>(words[i + c]));
    }
    for (int64_t j = 0; j < padded; j += 8) {
      const __m512i other = _mm512_loadu_si512(words + j);
      for (int c = 0; c < 4; ++c) {
        larger[c] = _mm512_mask_add_epi64(larger[c],
                                          _mm512_cmpgt_epu64_mask(other, candidate[c]),
                                          larger[c], one);
      }
    }
    for (int c = 0; c < 4 && i + c < count; ++c) {
      picked[PositionOf(words[i + c])] = _mm512_reduce_add_epi64(larger[c]) < k;
    }
  }
#else
  std::nth_element(words, words + (k - 1), words + count, std::greater<uint64_t>());
  for (int64_t i = 0; i < k; ++i) picked[PositionOf(words[i])] = true;
#endif
}

inline float Rounded(float x, float*) { return x; }
inline float Rounded(float x, sim_merlin::Bfloat16*) {
  return static_cast<float>(static_cast<sim_merlin::Bfloat16>(x));  // to nearest even
}

// Masked 16-bit loads need AVX512BW and VL besides AVX512F.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SIM_MERLIN_DOT_AVX512 1
#endif

#ifdef SIM_MERLIN_DOT_AVX512
// The first `count` <= 16 elements of a row as float32 lanes (zeros after).
inline __m512 Load16(const float* row, int64_t count) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), row);
}
inline __m512 Load16(const sim_merlin::Bfloat16* row, int64_t count) {
  const __m256i half = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1u), row);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#endif

// <row, q> over `width` elements (widened exactly to float32), in one fixed order whatever the
// row: 16 lanes of fused multiply-adds, then the lanes' sum.
template <typename T>
inline float Dot(const T* row, const float* q, int64_t width) {
#ifdef SIM_MERLIN_DOT_AVX512
  __m512 sum = _mm512_setzero_ps();
  for (int64_t d = 0; d < width; d += 16) {
    const int64_t count = std::min<int64_t>(16, width - d);
    sum = _mm512_fmadd_ps(Load16(row + d, count), Load16(q + d, count), sum);
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.0f;
  for (int64_t d = 0; d < width; ++d) sum += static_cast<float>(row[d]) * q[d];
  return sum;
#endif
}

class TopKMaskKernel : public OpKernel {
 public:
  explicit TopKMaskKernel(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("k", &k_));
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
  }

 protected:
  int k_ = 0, threads_ = 0;
};

class TopKMaskOp : public TopKMaskKernel {
 public:
  using TopKMaskKernel::TopKMaskKernel;

  void Compute(OpKernelContext* context) override {
    const Tensor &keys = context->input(0), &valid = context->input(1);
    OP_REQUIRES(context, keys.dims() == 2 && keys.shape() == valid.shape(),
                tensorflow::errors::InvalidArgument(
                    "keys and valid must be [batch, length] of one shape, got ",
                    keys.shape().DebugString(), " and ", valid.shape().DebugString()));
    Tensor* selection = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, keys.shape(), &selection));
    const int64_t rows = keys.dim_size(0), length = keys.dim_size(1);
    const float* key = keys.flat<float>().data();
    const bool* is_valid = valid.flat<bool>().data();
    bool* picked = selection->flat<bool>().data();
    sim_merlin::ParallelFor(
        context, rows, 20 * length, threads_, [&](int64_t first, int64_t last) {
          std::vector<uint64_t> words(length + 12);
          for (int64_t b = first; b < last; ++b) {
            SelectRow(key + b * length, is_valid + b * length, length, k_, words.data(),
                      picked + b * length);
          }
        });
  }
};

template <typename T>
class DotTopKMaskOp : public TopKMaskKernel {
 public:
  using TopKMaskKernel::TopKMaskKernel;

  void Compute(OpKernelContext* context) override {
    const Tensor &query = context->input(0), &history = context->input(1),
                 &valid = context->input(2);
    OP_REQUIRES(context, query.dims() == 2 && history.dims() == 3 && valid.dims() == 2 &&
                             history.dim_size(0) == query.dim_size(0) &&
                             history.dim_size(2) == query.dim_size(1) &&
                             valid.dim_size(0) == history.dim_size(0) &&
                             valid.dim_size(1) == history.dim_size(1),
                tensorflow::errors::InvalidArgument(
                    "query must be [batch, dim], history [batch, length, dim] and valid "
                    "[batch, length], got ", query.shape().DebugString(), ", ",
                    history.shape().DebugString(), " and ", valid.shape().DebugString()));
    Tensor* selection = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, valid.shape(), &selection));
    const int64_t rows = history.dim_size(0), length = history.dim_size(1);
    const int64_t width = history.dim_size(2);
    const T* queries = query.flat<T>().data();
    const T* steps = history.flat<T>().data();
    const bool* is_valid = valid.flat<bool>().data();
    bool* picked = selection->flat<bool>().data();
    sim_merlin::ParallelFor(
        context, rows, 20 * length + 2 * length * width, threads_,
        [&](int64_t first, int64_t last) {
          std::vector<uint64_t> words(length + 12);
          std::vector<float> q(width), keys(length);
          for (int64_t b = first; b < last; ++b) {
            sim_merlin::Widen(queries + b * width, width, q.data());
            const T* h = steps + b * length * width;
            const bool* row_valid = is_valid + b * length;
            for (int64_t t = 0; t < length; ++t) {
              keys[t] = Rounded(Dot(h + t * width, q.data(), width), static_cast<T*>(nullptr));
            }
            SelectRow(keys.data(), row_valid, length, k_, words.data(), picked + b * length);
          }
        });
  }
};

REGISTER_KERNEL_BUILDER(Name("SimMerlinTopKMask").Device(DEVICE_CPU), TopKMaskOp);
REGISTER_KERNEL_BUILDER(
    Name("SimMerlinDotTopKMask").Device(DEVICE_CPU).TypeConstraint<float>("T"),
    DotTopKMaskOp<float>);
REGISTER_KERNEL_BUILDER(
    Name("SimMerlinDotTopKMask").Device(DEVICE_CPU).TypeConstraint<sim_merlin::Bfloat16>("T"),
    DotTopKMaskOp<sim_merlin::Bfloat16>);

}  // namespace
