// Row blocks and the sigmoid, shared by the fused kernels (sim_merlin.kernels).
//
// A kernel processes its rows in blocks small enough that a block's whole computation stays in
// cache, runs the blocks in parallel (parallel.h), and sums per-block weight gradients in block
// order afterwards, so its results do not depend on the number of threads.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "Eigen/Core"
#include "parallel.h"
#include "tensorflow/core/framework/numeric_types.h"

namespace sim_merlin {

// Scratch space: a vector whose resize leaves new elements uninitialised, for buffers every user
// overwrites before reading (zero-filling each block's buffers had cost several percent of the
// gradient kernels), starting on a cache line: a tile unit's row loads (products.h) then each
// touch one line, not two (malloc's 16-byte alignment had made the AMX products 1.7-3x slower).
constexpr std::size_t kCacheLine = 64;

template <typename T>
struct DefaultInit : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInit<U>;
  };
  DefaultInit() = default;
  template <typename U>
  DefaultInit(const DefaultInit<U>&) noexcept {}
  T* allocate(std::size_t count) {
    return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t(kCacheLine)));
  }
  void deallocate(T* place, std::size_t count) noexcept {
    ::operator delete(place, count * sizeof(T), std::align_val_t(kCacheLine));
  }
  template <typename U, typename... Args>
  void construct(U* place, Args&&... args) {
    if constexpr (sizeof...(Args) == 0) {
      ::new (static_cast<void*>(place)) U;
    } else {
      ::new (static_cast<void*>(place)) U(std::forward<Args>(args)...);
    }
  }
};
template <typename T>
using Buffer = std::vector<T, DefaultInit<T>>;
using FloatBuffer = Buffer<float>;

inline int64_t BlockCount(int64_t rows, int64_t rows_per_block) {
  return (rows + rows_per_block - 1) / rows_per_block;
}

// Runs work(begin, end) on each block [begin, end) of rows_per_block rows of [0, rows), in
// parallel; cost_per_row in cycles (for TensorFlow's sharder).
template <typename Work>
void ForEachRowBlock(tensorflow::OpKernelContext* context, int threads, int64_t rows,
                     int64_t rows_per_block, int64_t cost_per_row, Work work) {
  ParallelFor(context, BlockCount(rows, rows_per_block), cost_per_row * rows_per_block, threads,
              [&](int64_t first, int64_t last) {
                for (int64_t block = first; block < last; ++block) {
                  const int64_t begin = block * rows_per_block;
                  work(begin, std::min(rows, begin + rows_per_block));
                }
              });
}

// The attributes every row-block kernel reads: bfloat16 products (float32 sums), and the threads
// of its own it may use when the intra-op pool has one (parallel.h).
class RowBlockKernel : public tensorflow::OpKernel {
 public:
  explicit RowBlockKernel(tensorflow::OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("bf16_products", &bf16_));
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
  }

 protected:
  bool bf16_ = false;
  int threads_ = 0;
};

// A block's rows as float32. A kernel's large inputs and outputs have the model's dtype (float32,
// or bfloat16 under mixed_bfloat16: no separate cast op over the whole tensor); its arithmetic is
// float32, so a bfloat16 block is converted on the way in (exact) and rounded to the nearest even
// bfloat16 on the way out, as TensorFlow's Cast does.
using Bfloat16 = Eigen::bfloat16;

inline void ToFloat(const Bfloat16* source, int64_t count, float* target) {
  const auto* bits = reinterpret_cast<const uint16_t*>(source);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= count; i += 16) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + i));
    _mm512_storeu_si512(target + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
#endif
  for (; i < count; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(target + i, &word, sizeof word);
  }
}

inline void ToBfloat16(const float* source, int64_t count, Bfloat16* target) {
  auto* bits = reinterpret_cast<uint16_t*>(target);
  int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  for (; i + 16 <= count; i += 16) {
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(source + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits + i),
                        reinterpret_cast<const __m256i&>(rounded));
  }
#endif
  for (; i < count; ++i) bits[i] = static_cast<Bfloat16>(source[i]).value;  // Eigen rounds to even
}

// Rows of either dtype into float32 rows (Widen: exact) and back (Narrow: rounded as above), as
// copies, for a kernel that gathers or scatters rows of a tensor of the model's dtype.
inline void Widen(const float* source, int64_t count, float* target) {
  std::copy_n(source, count, target);
}
inline void Widen(const Bfloat16* source, int64_t count, float* target) {
  ToFloat(source, count, target);
}
inline void Narrow(const float* source, int64_t count, float* target) {
  std::copy_n(source, count, target);
}
inline void Narrow(const float* source, int64_t count, Bfloat16* target) {
  ToBfloat16(source, count, target);
}

// An input's rows: the tensor's own memory when float32, else a converted copy in `buffer`.
inline const float* InputRows(const float* rows, int64_t count, FloatBuffer*) {
  return rows;
}
inline const float* InputRows(const Bfloat16* rows, int64_t count, FloatBuffer* buffer) {
  buffer->resize(count);
  ToFloat(rows, count, buffer->data());
  return buffer->data();
}

// Where a block writes an output's rows: the output itself when float32, else `buffer`, which
// StoreRows then rounds into the output.
inline float* OutputRows(float* rows, int64_t, FloatBuffer*) { return rows; }
inline float* OutputRows(Bfloat16*, int64_t count, FloatBuffer* buffer) {
  buffer->resize(count);
  return buffer->data();
}
inline void StoreRows(const float*, int64_t, float*) {}
inline void StoreRows(const float* computed, int64_t count, Bfloat16* rows) {
  ToBfloat16(computed, count, rows);
}

// sigmoid(x) = (1 + tanh(x / 2)) / 2: Eigen's vectorised tanh is a short rational function,
// several times cheaper than its logistic (which TensorFlow's Sigmoid uses); they agree to float32
// rounding.
template <typename Expression>
inline auto Sigmoid(const Expression& x) {
  return 0.5f * (0.5f * x).tanh() + 0.5f;
}

// Sigmoid in place over `count` contiguous floats, every element by the same vector code (the
// last vector masked). Eigen evaluates a contiguous array as whole vectors plus a scalar tail,
// whose tanh (and rounding) differs from the vector one: a row that ends a block would then get
// other values than the same row elsewhere, and a sample's score would depend on its batch.
inline void SigmoidInPlace(float* data, int64_t count) {
#if defined(__AVX512F__)
  using Packet = Eigen::internal::Packet16f;
  const Packet half = Eigen::internal::pset1<Packet>(0.5f);
  auto sigmoid = [&half](Packet x) {
    using namespace Eigen::internal;  // NOLINT: Eigen's packet functions
    return padd(pmul(half, ptanh(pmul(half, x))), half);
  };
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    Eigen::internal::pstoreu(data + i, sigmoid(Eigen::internal::ploadu<Packet>(data + i)));
  }
  if (i < count) {
    const __mmask16 valid = static_cast<__mmask16>((1u << (count - i)) - 1u);
    _mm512_mask_storeu_ps(data + i, valid, sigmoid(_mm512_maskz_loadu_ps(valid, data + i)));
  }
#else
  for (int64_t i = 0; i < count; ++i) data[i] = 0.5f * std::tanh(0.5f * data[i]) + 0.5f;
#endif
}

}  // namespace sim_merlin
