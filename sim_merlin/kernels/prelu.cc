// PReLU forward and gradient as one op each (sim_merlin.kernels).
//
// The CTR towers' PReLU (Keras: relu(x) - alpha * relu(-x), one slope per unit) is six
// TensorFlow ops forward and more backward, each a pass over the [batch, units] activations;
// these kernels make one pass each way. Values are those of the Keras layer's ops: with inputs x
// and slopes a of dtype T (the layer's compute dtype: bfloat16 under mixed_bfloat16),
//   y = x if x > 0, T(a x) if x < 0, else 0
//   dx = dy if x > 0, T(a dy) if x < 0, else 0
//   da = T(sum over rows of T(dy x) where x < 0)   (float32 sums, in block order)
// where T(.) rounds a float32 value to T (to nearest even for bfloat16, as TensorFlow's ops do).
// The slopes cover x's trailing dimensions (Keras: alpha is [units] for [batch, units] inputs).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "products.h"  // TailMask
#include "rows.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::shape_inference::InferenceContext;

using sim_merlin::Bfloat16;
using sim_merlin::FloatBuffer;
using sim_merlin::InputRows;
using sim_merlin::OutputRows;
using sim_merlin::StoreRows;

constexpr int64_t kElementsPerBlock = 1 << 14;  // a block's rows in L1 (64 KB as float32)

inline int64_t RowsPerBlock(int64_t width) {
  return std::max<int64_t>(1, kElementsPerBlock / width);
}

REGISTER_OP("SimMerlinPrelu")
    .Attr("T: {float, bfloat16}")
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("inputs: T")        // x [..., trailing dims]
    .Input("alpha: T")         // a [trailing dims]
    .Output("outputs: T")      // y, x's shape
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return Status();
    });

REGISTER_OP("SimMerlinPreluGrad")
    .Attr("T: {float, bfloat16}")
    .Attr("threads: int = 0")
    .Input("inputs: T")
    .Input("alpha: T")
    .Input("outputs_grad: T")  // dy, x's shape
    .Output("inputs_grad: T")  // dx
    .Output("alpha_grad: T")   // da
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      return Status();
    });

// x's rows of `width` elements, `width` being alpha's size; checked: x's trailing dimensions are
// alpha's shape.
Status RowsOf(const Tensor& x, const Tensor& alpha, int64_t* rows, int64_t* width) {
  const int extra = x.dims() - alpha.dims();
  bool matches = extra >= 0;
  for (int i = 0; matches && i < alpha.dims(); ++i) {
    matches = x.dim_size(extra + i) == alpha.dim_size(i);
  }
  if (!matches || alpha.NumElements() == 0) {
    return tensorflow::errors::InvalidArgument(
        "alpha's shape must be the trailing dimensions of the inputs' shape (one slope per "
        "unit), got alpha ", alpha.shape().DebugString(), " for inputs ",
        x.shape().DebugString());
  }
  *width = alpha.NumElements();
  *rows = x.NumElements() / *width;
  return Status();
}

// The value a float32 result has once stored as T: exact for float; for bfloat16 rounded to
// nearest even (finite values).
inline float AsStored(float value, float) { return value; }
inline float AsStored(float value, Bfloat16) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&value, &bits, sizeof bits);
  return value;
}

// v where x > 0, a v where x < 0, else +0: the forward value (v = x) and the input gradient
// (v = dy) alike. The vector form is branch-free (the signs of activations are random, and a
// branch per element had cost 4 ns each) and sets *negative to the lanes where x < 0.
inline float BySign(float x, float a, float v) {
  return x > 0.0f ? v : (x < 0.0f ? a * v : 0.0f);
}
#if defined(__AVX512BF16__) && defined(__AVX512F__)  // (TailMask's condition, products.h)
inline __m512 BySign(__m512 x, __m512 a, __m512 v, __mmask16* negative) {
  const __m512 zero = _mm512_setzero_ps();
  *negative = _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ);
  return _mm512_mask_mov_ps(_mm512_maskz_mul_ps(*negative, a, v),
                            _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), v);
}
#endif

// One row of `width` values: y = x where x > 0, a x where x < 0, else +0.
inline void PreluRow(const float* x, const float* a, int64_t width, float* y) {
  int64_t j = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  for (; j < width; j += 16) {
    const __mmask16 valid = sim_merlin::TailMask(width - j);
    const __m512 xv = _mm512_maskz_loadu_ps(valid, x + j);
    __mmask16 negative;
    _mm512_mask_storeu_ps(
        y + j, valid, BySign(xv, _mm512_maskz_loadu_ps(valid, a + j), xv, &negative));
  }
#endif
  for (; j < width; ++j) y[j] = BySign(x[j], a[j], x[j]);
}

// One row's gradient: dx = dy where x > 0, a dy where x < 0, else 0; sums += T(dy x) where x < 0.
template <typename T>
inline void PreluGradRow(const float* x, const float* a, const float* dy, int64_t width,
                         float* dx, float* sums) {
  int64_t j = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  for (; j < width; j += 16) {
    const __mmask16 valid = sim_merlin::TailMask(width - j);
    const __m512 xv = _mm512_maskz_loadu_ps(valid, x + j);
    const __m512 gv = _mm512_maskz_loadu_ps(valid, dy + j);
    __mmask16 negative;
    _mm512_mask_storeu_ps(
        dx + j, valid, BySign(xv, _mm512_maskz_loadu_ps(valid, a + j), gv, &negative));
    __m512 term = _mm512_maskz_mul_ps(negative, gv, xv);
    if (std::is_same<T, Bfloat16>::value) {  // rounded to bfloat16 (nearest even) and back
      const __m256bh rounded = _mm512_cvtneps_pbh(term);
      term = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(rounded)), 16));
    }
    _mm512_mask_storeu_ps(sums + j, valid,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(valid, sums + j), term));
  }
#endif
  for (; j < width; ++j) {
    dx[j] = BySign(x[j], a[j], dy[j]);
    sums[j] += x[j] < 0.0f ? AsStored(dy[j] * x[j], T()) : 0.0f;
  }
}

// The attribute both ops read: the threads of its own an op may use (parallel.h).
class PreluKernel : public tensorflow::OpKernel {
 public:
  explicit PreluKernel(tensorflow::OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
  }

 protected:
  int threads_ = 0;
};

template <typename T>
class PreluOp : public PreluKernel {
 public:
  using PreluKernel::PreluKernel;

  void Compute(OpKernelContext* context) override {
    const Tensor &x = context->input(0), &alpha = context->input(1);
    int64_t rows = 0, width = 0;
    OP_REQUIRES_OK(context, RowsOf(x, alpha, &rows, &width));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y));
    FloatBuffer alpha_buffer;
    const float* a = InputRows(alpha.flat<T>().data(), width, &alpha_buffer);
    const T* x_rows = x.flat<T>().data();
    T* y_rows = y->flat<T>().data();
    sim_merlin::ForEachRowBlock(
        context, threads_, rows, RowsPerBlock(width), 4 * width, [&](int64_t begin, int64_t end) {
          const int64_t n = end - begin;
          FloatBuffer x_buffer, y_buffer;
          const float* in = InputRows(x_rows + begin * width, n * width, &x_buffer);
          float* out = OutputRows(y_rows + begin * width, n * width, &y_buffer);
          for (int64_t i = 0; i < n; ++i) PreluRow(in + i * width, a, width, out + i * width);
          StoreRows(out, n * width, y_rows + begin * width);
        });
  }
};

template <typename T>
class PreluGradOp : public PreluKernel {
 public:
  using PreluKernel::PreluKernel;

  void Compute(OpKernelContext* context) override {
    const Tensor &x = context->input(0), &alpha = context->input(1), &dy = context->input(2);
    int64_t rows = 0, width = 0;
    OP_REQUIRES_OK(context, RowsOf(x, alpha, &rows, &width));
    OP_REQUIRES(context, dy.shape() == x.shape(),
                tensorflow::errors::InvalidArgument(
                    "outputs_grad must have the inputs' shape ", x.shape().DebugString(),
                    ", got ", dy.shape().DebugString()));
    Tensor *dx = nullptr, *da = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, alpha.shape(), &da));
    FloatBuffer alpha_buffer;
    const float* a = InputRows(alpha.flat<T>().data(), width, &alpha_buffer);
    const T* x_rows = x.flat<T>().data();
    const T* dy_rows = dy.flat<T>().data();
    T* dx_rows = dx->flat<T>().data();
    const int64_t block = RowsPerBlock(width), blocks = sim_merlin::BlockCount(rows, block);
    // Each block's slope gradient, summed in block order afterwards: the same sums whatever the
    // threads.
    std::vector<float> block_sums(blocks * width, 0.0f);
    sim_merlin::ForEachRowBlock(
        context, threads_, rows, block, 8 * width, [&](int64_t begin, int64_t end) {
          const int64_t n = end - begin;
          FloatBuffer x_buffer, dy_buffer, dx_buffer;
          const float* in = InputRows(x_rows + begin * width, n * width, &x_buffer);
          const float* grad = InputRows(dy_rows + begin * width, n * width, &dy_buffer);
          float* out = OutputRows(dx_rows + begin * width, n * width, &dx_buffer);
          float* sums = block_sums.data() + (begin / block) * width;
          for (int64_t i = 0; i < n; ++i) {
            PreluGradRow<T>(in + i * width, a, grad + i * width, width, out + i * width, sums);
          }
          StoreRows(out, n * width, dx_rows + begin * width);
        });
    std::vector<float> total(width, 0.0f);
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t j = 0; j < width; ++j) total[j] += block_sums[b * width + j];
    }
    T* da_values = da->flat<T>().data();
    for (int64_t j = 0; j < width; ++j) da_values[j] = static_cast<T>(total[j]);
  }
};

#define SIM_MERLIN_REGISTER(T)                                                                  \
  REGISTER_KERNEL_BUILDER(Name("SimMerlinPrelu").Device(DEVICE_CPU).TypeConstraint<T>("T"),     \
                          PreluOp<T>);                                                          \
  REGISTER_KERNEL_BUILDER(Name("SimMerlinPreluGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          PreluGradOp<T>);
SIM_MERLIN_REGISTER(float)
SIM_MERLIN_REGISTER(Bfloat16)
#undef SIM_MERLIN_REGISTER

}  // namespace
