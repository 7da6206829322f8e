// Fused CPU kernels for DIEN's two recurrences (sim_merlin.kernels).
//
// TensorFlow runs an unrolled GRU as about twenty small ops per step (products, splits, sigmoids,
// selects), each a pass over memory and a scheduling round; their gradients double that. These
// kernels run the whole recurrence of a block of rows in one pass that stays in cache, and give
// the gradient as one op. Each step projects its inputs (p = x_t W + b, the "projected" below)
// just before the step uses them, and the gradient takes that product's gradients right after
// the step's: a block's projections for all of its steps (1.5 MB at 128 rows x 10 steps x 288)
// had spilled out of L2 between the product that wrote them and the steps that read them.
//
// SimMerlinGru (Keras GRU, reset_after=True; gate order z, r, h):
//   inner = h U + b;  z = sig(p_z + inner_z);  r = sig(p_r + inner_r)
//   c = tanh(p_h + r * inner_h);  h' = z h + (1 - z) c;  h_t = m_t h' + (1 - m_t) h_{t-1}
// SimMerlinAugru (DIEN's AUGRU, as sim_merlin.blocks.interest.AUGRUCell; gates r, u):
//   [r, u] = sig(p_g + s W_g);  c = tanh(p_c + (r s) W_c);  u' = (1 - a_t) u
//   s' = u' s + (1 - u') c;  s_t = m_t s' + (1 - m_t) s_{t-1};  output: the last state.
// The forward ops can keep their activations for the gradient (keep_activations: the AUGRU's
// 15 KB per row at u = 96, T = 10, the GRU's gates and candidates, as much), which then skips
// the forward products: worth it where products are slow (AVX512-BF16), while on AMX
// recomputing was cheaper than writing and re-reading them; without them the gradient ops
// recompute them block by block. Element-wise work runs as
// Eigen array expressions over a whole block (vectorised sigmoid and tanh, as TensorFlow's own).

#include <algorithm>
#include <cmath>
#include <vector>

#include "Eigen/Core"
#include "products.h"
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
using tensorflow::TensorShape;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

using sim_merlin::Matrix;
using sim_merlin::Products;
using sim_merlin::Bfloat16;
using sim_merlin::InputRows;
using sim_merlin::OutputRows;
using sim_merlin::Sigmoid;
using sim_merlin::StoreRows;
using sim_merlin::View;
using sim_merlin::Weight;
using MatrixMap = Eigen::Map<Matrix>;
using ConstRowMap = Eigen::Map<const Eigen::RowVectorXf>;
using Array = Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Column = Eigen::ArrayXf;  // one value per row of a block (mask, attention score)

constexpr int64_t kRowsPerBlock = 128;  // a block's whole recurrence stays in L2

inline int64_t BlockCount(int64_t rows) { return sim_merlin::BlockCount(rows, kRowsPerBlock); }

template <typename Work>
void ForEachRowBlock(OpKernelContext* context, int threads, int64_t rows, int64_t cost_per_row,
                     Work work) {
  sim_merlin::ForEachRowBlock(context, threads, rows, kRowsPerBlock, cost_per_row, work);
}

using StepRows = Eigen::Map<Matrix, 0, Eigen::OuterStride<>>;
using ConstStepRows = Eigen::Map<const Matrix, 0, Eigen::OuterStride<>>;

// Step t of rows begin..begin + n of a [rows, T, width] tensor, in place (rows T * width apart).
inline ConstStepRows StepOf(const float* data, int64_t steps, int64_t width, int64_t begin,
                            int64_t n, int64_t t) {
  return ConstStepRows(data + (begin * steps + t) * width, n, width,
                       Eigen::OuterStride<>(steps * width));
}

inline StepRows StepOf(float* data, int64_t steps, int64_t width, int64_t begin, int64_t n,
                       int64_t t) {
  return StepRows(data + (begin * steps + t) * width, n, width,
                  Eigen::OuterStride<>(steps * width));
}

inline View StepView(const float* data, int64_t steps, int64_t width, int64_t begin, int64_t n,
                     int64_t t) {
  return {data + (begin * steps + t) * width, n, width, steps * width, 1};
}

// Column t of a [rows, T] tensor, rows begin..end.
inline void GatherColumn(const float* source, int64_t steps, int64_t begin, int64_t n, int64_t t,
                         float* target) {
  for (int64_t i = 0; i < n; ++i) target[i] = source[(begin + i) * steps + t];
}

inline void ScatterColumn(const float* source, int64_t steps, int64_t begin, int64_t n, int64_t t,
                          float* target) {
  for (int64_t i = 0; i < n; ++i) target[(begin + i) * steps + t] = source[i];
}

// sequence [B, T, F], its kernel [F, gate_width] and input bias [gate_width], mask [B, T].
Status CheckRecurrentInputs(const Tensor& sequence, const Tensor& kernel, const Tensor& input_bias,
                            const Tensor& mask, int64_t gate_width) {
  if (sequence.dims() != 3) {
    return tensorflow::errors::InvalidArgument("sequence must be [batch, steps, features], got ",
                                               sequence.shape().DebugString());
  }
  if (kernel.dims() != 2 || kernel.dim_size(0) != sequence.dim_size(2) ||
      kernel.dim_size(1) != gate_width) {
    return tensorflow::errors::InvalidArgument("kernel must be [features, ", gate_width, "] = [",
                                               sequence.dim_size(2), ", ", gate_width, "], got ",
                                               kernel.shape().DebugString());
  }
  if (input_bias.NumElements() != gate_width) {
    return tensorflow::errors::InvalidArgument("input_bias must have ", gate_width,
                                               " elements, got ", input_bias.shape().DebugString());
  }
  if (mask.dims() != 2 || mask.dim_size(0) != sequence.dim_size(0) ||
      mask.dim_size(1) != sequence.dim_size(1)) {
    return tensorflow::errors::InvalidArgument("mask must be [batch, steps] = ",
                                               sequence.dim_size(0), "x",
                                               sequence.dim_size(1), ", got ",
                                               mask.shape().DebugString());
  }
  return Status();
}

// The input projection of step t of a block's n rows (x: their [n, T, F] inputs): x_t [n, F] times
// the kernel plus the input bias; and its gradients, given dp_t [n, width].
struct InputProjection {
  const float* bias;
  int64_t features, width;
  Weight kernel, kernel_transposed;

  InputProjection(const Tensor& kernel_tensor, const Tensor& bias_tensor, bool bf16,
                  bool gradients)
      : bias(bias_tensor.flat<float>().data()),
        features(kernel_tensor.dim_size(0)),
        width(kernel_tensor.dim_size(1)),
        kernel({kernel_tensor.flat<float>().data(), features, width, width, 1}, bf16),
        kernel_transposed(gradients ? kernel.view.Transposed() : View{nullptr, 0, 0, 0, 0},
                          bf16 && gradients) {}

  void Forward(const float* x, int64_t n, int64_t steps, int64_t t, Products* products,
               Matrix* projected) const {
    projected->resize(n, width);
    products->Multiply(StepView(x, steps, features, 0, n, t), kernel, projected->data(), width,
                       false);
    projected->rowwise() += ConstRowMap(bias, width);
  }

  // dx_t [n, F] (in dx [n, T, F]) = dp_t W^T; dW += x_t^T dp_t; db += the column sums of dp_t.
  void Backward(const float* x, int64_t steps, int64_t t, const Matrix& dp, Products* products,
                float* dx, Matrix* dW, Eigen::RowVectorXf* db) const {
    const int64_t n = dp.rows();
    products->Multiply(View::Of(dp), kernel_transposed, dx + t * features, steps * features,
                       false);
    products->Multiply(StepView(x, steps, features, 0, n, t).Transposed(), View::Of(dp),
                       dW->data(), width, true);
    db->noalias() += dp.colwise().sum();
  }
};

// A gradient op's activations input: empty (the gradient recomputes the forward pass) or the
// forward op's kept activations, `size` floats.
Status CheckKeptActivations(const Tensor& activations, int64_t size, bool* recompute) {
  *recompute = activations.NumElements() == 0;
  if (*recompute || activations.NumElements() == size) return Status();
  return tensorflow::errors::InvalidArgument("activations must be empty or the forward op's, ",
                                             size, " floats; got ",
                                             activations.shape().DebugString());
}

// Per-block weight gradients summed in block order into `target` (deterministic).
template <typename Part>
void SumBlocks(const std::vector<Part>& parts, Tensor* target) {
  float* sum = target->flat<float>().data();
  const int64_t size = target->NumElements();
  std::fill_n(sum, size, 0.0f);
  for (const Part& part : parts) {
    for (int64_t i = 0; i < size; ++i) sum[i] += part.data()[i];
  }
}

// ------------------------------------------------------------------------------------------------
// GRU

// A block's kept activations of one step (keep_activations): [n, 4u], z | r | c | (h U)_h, at
// (begin T + t n) 4u in the forward op's activations output.
using GruKept = Eigen::Map<Array>;
using ConstGruKept = Eigen::Map<const Array>;

Status CheckGruWeights(const Tensor& recurrent_kernel, const Tensor& recurrent_bias) {
  if (recurrent_kernel.dims() != 2 ||
      recurrent_kernel.dim_size(1) != 3 * recurrent_kernel.dim_size(0)) {
    return tensorflow::errors::InvalidArgument("recurrent_kernel must be [u, 3u], got ",
                                               recurrent_kernel.shape().DebugString());
  }
  if (recurrent_bias.NumElements() != recurrent_kernel.dim_size(1)) {
    return tensorflow::errors::InvalidArgument("recurrent_bias must have 3u elements, got ",
                                               recurrent_bias.shape().DebugString());
  }
  return Status();
}

REGISTER_OP("SimMerlinGru")
    .Attr("T: {float, bfloat16}")  // the model's dtype: the large inputs' and outputs' (rows.h)
    .Attr("bf16_products: bool = false")  // bfloat16 products, float32 sums
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("sequence: T")              // [B, T, F]
    .Input("kernel: float")            // [F, 3u]
    .Input("input_bias: float")        // [3u]
    .Input("recurrent_kernel: float")  // [u, 3u]
    .Input("recurrent_bias: float")    // [3u]
    .Input("mask: float")              // [B, T], 1 = step taken
    // true: the activations output holds each step's gates z, r, candidate and h U's candidate
    // part (4u floats per row and step), so the gradient op does not recompute them; false: it
    // is empty and the gradient recomputes them
    .Attr("keep_activations: bool = false")
    .Output("states: T")               // [B, T, u]
    .Output("activations: float")      // [B T 4u] or [0]
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle sequence, kernel;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &sequence));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &kernel));
      c->set_output(0, c->MakeShape({c->Dim(sequence, 0), c->Dim(sequence, 1),
                                     c->Dim(kernel, 0)}));
      c->set_output(1, c->Vector(c->UnknownDim()));
      return Status();
    });

REGISTER_OP("SimMerlinGruGrad")
    .Attr("T: {float, bfloat16}")
    .Attr("bf16_products: bool = false")  // bfloat16 products, float32 sums
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("sequence: T")
    .Input("kernel: float")
    .Input("input_bias: float")
    .Input("recurrent_kernel: float")
    .Input("recurrent_bias: float")
    .Input("mask: float")
    .Input("states: T")       // the forward output
    .Input("states_grad: T")  // [B, T, u]
    .Input("activations: float")  // the forward op's: kept activations, or empty (recomputed)
    .Output("sequence_grad: T")
    .Output("kernel_grad: float")
    .Output("input_bias_grad: float")
    .Output("recurrent_kernel_grad: float")
    .Output("recurrent_bias_grad: float")
    .SetShapeFn([](InferenceContext* c) {
      for (int i = 0; i < 5; ++i) c->set_output(i, c->input(i));
      return Status();
    });

template <typename T>
class GruOp : public sim_merlin::RowBlockKernel {
 public:
  explicit GruOp(OpKernelConstruction* context) : RowBlockKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("keep_activations", &keep_activations_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& sequence = context->input(0);
    const Tensor& kernel = context->input(3);
    const Tensor& bias = context->input(4);
    const Tensor& mask = context->input(5);
    OP_REQUIRES_OK(context, CheckGruWeights(kernel, bias));
    const int64_t u = kernel.dim_size(0);
    OP_REQUIRES_OK(context, CheckRecurrentInputs(sequence, context->input(1), context->input(2),
                                                 mask, 3 * u));
    const int64_t rows = sequence.dim_size(0), steps = sequence.dim_size(1);
    const int64_t features = sequence.dim_size(2);
    Tensor* states = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({rows, steps, u}), &states));
    Tensor* activations = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(
                                1, TensorShape({keep_activations_ ? rows * steps * 4 * u : 0}),
                                &activations));
    float* kept = activations->flat<float>().data();
    const T* sequence_rows = sequence.flat<T>().data();
    const float* m = mask.flat<float>().data();
    T* states_rows = states->flat<T>().data();
    const InputProjection projection(context->input(1), context->input(2), bf16_, false);
    const Weight U({kernel.flat<float>().data(), u, 3 * u, 3 * u, 1}, bf16_);
    ConstRowMap b(bias.flat<float>().data(), 3 * u);

    ForEachRowBlock(context, threads_, rows, steps * (u + features) * 3 * u * 2,
                    [&](int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      sim_merlin::FloatBuffer in_buffer, out_buffer;  // this block's rows as float32 (rows.h)
      const float* x = InputRows(sequence_rows + begin * steps * features, n * steps * features,
                                 &in_buffer);
      float* out = OutputRows(states_rows + begin * steps * u, n * steps * u, &out_buffer);
      Products products(bf16_);
      Matrix projected;
      Matrix h = Matrix::Zero(n, u), inner(n, 3 * u);
      Array zr(n, 2 * u), c(n, u);
      Column keep(n);
      for (int64_t t = 0; t < steps; ++t) {
        projection.Forward(x, n, steps, t, &products, &projected);
        products.Multiply(View::Of(h), U, inner.data(), 3 * u, false);
        inner.rowwise() += b;
        const Matrix& xp = projected;  // this step's projected inputs
        GatherColumn(m, steps, begin, n, t, keep.data());
        zr = Sigmoid(xp.leftCols(2 * u).array() + inner.leftCols(2 * u).array());
        c = (xp.rightCols(u).array() + zr.rightCols(u) * inner.rightCols(u).array()).tanh();
        const auto z = zr.leftCols(u);
        h.array() += ((z * h.array() + (1.0f - z) * c) - h.array()).colwise() * keep;
        StepOf(out, steps, u, 0, n, t) = h;
        if (keep_activations_) {
          GruKept step_kept(kept + (begin * steps + t * n) * 4 * u, n, 4 * u);
          step_kept.leftCols(2 * u) = zr;
          step_kept.middleCols(2 * u, u) = c;
          step_kept.rightCols(u) = inner.rightCols(u).array();
        }
      }
      StoreRows(out, n * steps * u, states_rows + begin * steps * u);
    });
  }

 private:
  bool keep_activations_ = false;
};

template <typename T>
class GruGradOp : public sim_merlin::RowBlockKernel {
 public:
  using RowBlockKernel::RowBlockKernel;

  void Compute(OpKernelContext* context) override {
    const Tensor& sequence = context->input(0);
    const Tensor& kernel = context->input(3);
    const Tensor& bias = context->input(4);
    const Tensor& mask = context->input(5);
    const Tensor& states = context->input(6);
    const Tensor& states_grad = context->input(7);
    const Tensor& activations = context->input(8);
    OP_REQUIRES_OK(context, CheckGruWeights(kernel, bias));
    const int64_t u = kernel.dim_size(0);
    OP_REQUIRES_OK(context, CheckRecurrentInputs(sequence, context->input(1), context->input(2),
                                                 mask, 3 * u));
    const int64_t rows = sequence.dim_size(0), steps = sequence.dim_size(1);
    const int64_t features = sequence.dim_size(2);
    OP_REQUIRES(context, states.shape() == states_grad.shape() && states.dims() == 3 &&
                             states.dim_size(0) == rows && states.dim_size(1) == steps &&
                             states.dim_size(2) == u,
                tensorflow::errors::InvalidArgument("states and their gradient must be [B, T, u]"));
    bool recompute = true;
    OP_REQUIRES_OK(context, CheckKeptActivations(activations, rows * steps * 4 * u, &recompute));
    const float* kept = activations.flat<float>().data();
    Tensor *sequence_grad = nullptr, *input_kernel_grad = nullptr, *input_bias_grad = nullptr;
    Tensor *kernel_grad = nullptr, *bias_grad = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, sequence.shape(), &sequence_grad));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(1).shape(),
                                                     &input_kernel_grad));
    OP_REQUIRES_OK(context, context->allocate_output(2, context->input(2).shape(),
                                                     &input_bias_grad));
    OP_REQUIRES_OK(context, context->allocate_output(3, kernel.shape(), &kernel_grad));
    OP_REQUIRES_OK(context, context->allocate_output(4, bias.shape(), &bias_grad));
    const T* sequence_rows = sequence.flat<T>().data();
    const float* m = mask.flat<float>().data();
    const T* states_rows = states.flat<T>().data();
    const T* states_grad_rows = states_grad.flat<T>().data();
    T* sequence_grad_rows = sequence_grad->flat<T>().data();
    const InputProjection projection(context->input(1), context->input(2), bf16_, true);
    const View kernel_view{kernel.flat<float>().data(), u, 3 * u, 3 * u, 1};
    const Weight U(kernel_view, bf16_), U_transposed(kernel_view.Transposed(), bf16_);
    ConstRowMap b(bias.flat<float>().data(), 3 * u);
    MatrixMap dU(kernel_grad->flat<float>().data(), u, 3 * u);
    Eigen::Map<Eigen::RowVectorXf> db(bias_grad->flat<float>().data(), 3 * u);
    dU.setZero();
    db.setZero();
    // Each block's weight gradients, summed in block order afterwards: the same result whatever
    // the threads (--deterministic).
    std::vector<Matrix> block_dUs(BlockCount(rows), Matrix::Zero(u, 3 * u));
    std::vector<Eigen::RowVectorXf> block_dbs(BlockCount(rows), Eigen::RowVectorXf::Zero(3 * u));
    std::vector<Matrix> block_dWs(BlockCount(rows), Matrix::Zero(features, 3 * u));
    std::vector<Eigen::RowVectorXf> block_dbxs(BlockCount(rows), Eigen::RowVectorXf::Zero(3 * u));

    ForEachRowBlock(context, threads_, rows, steps * (u + features) * 3 * u * 6,
                    [&](int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      sim_merlin::FloatBuffer x_buffer, hs_buffer, dhs_buffer, dx_buffer;  // as float32 (rows.h)
      const float* x = InputRows(sequence_rows + begin * steps * features, n * steps * features,
                                 &x_buffer);
      const float* hs = InputRows(states_rows + begin * steps * u, n * steps * u, &hs_buffer);
      const float* dhs = InputRows(states_grad_rows + begin * steps * u, n * steps * u,
                                   &dhs_buffer);
      float* dx = OutputRows(sequence_grad_rows + begin * steps * features, n * steps * features,
                             &dx_buffer);
      Products products(bf16_);
      Matrix projected, d_projected(n, 3 * u);
      Matrix& block_dU = block_dUs[begin / kRowsPerBlock];
      Eigen::RowVectorXf& block_db = block_dbs[begin / kRowsPerBlock];
      Matrix inner(n, 3 * u), d_inner(n, 3 * u);
      const Matrix zeros = Matrix::Zero(n, u);
      Matrix g = Matrix::Zero(n, u);  // gradient reaching the state after step t
      Array zr(n, 2 * u), c(n, u), hh(n, u), total(n, u), through(n, u), dc(n, u);
      Column keep(n);
      for (int64_t t = steps - 1; t >= 0; --t) {
        const View previous_view = t == 0 ? View::Of(zeros) : StepView(hs, steps, u, 0, n, t - 1);
        const ConstStepRows previous(previous_view.data, n, u,
                                     Eigen::OuterStride<>(previous_view.row_stride));
        if (recompute) {
          projection.Forward(x, n, steps, t, &products, &projected);
          products.Multiply(previous_view, U, inner.data(), 3 * u, false);
          inner.rowwise() += b;
          const Matrix& xp = projected;  // this step's projected inputs
          zr = Sigmoid(xp.leftCols(2 * u).array() + inner.leftCols(2 * u).array());
          hh = inner.rightCols(u).array();
          c = (xp.rightCols(u).array() + zr.rightCols(u) * hh).tanh();
        } else {  // the forward op's values of this step
          const ConstGruKept step_kept(kept + (begin * steps + t * n) * 4 * u, n, 4 * u);
          zr = step_kept.leftCols(2 * u);
          c = step_kept.middleCols(2 * u, u);
          hh = step_kept.rightCols(u);
        }
        const auto dh = StepOf(dhs, steps, u, 0, n, t);
        GatherColumn(m, steps, begin, n, t, keep.data());
        const auto z = zr.leftCols(u);
        const auto r = zr.rightCols(u);
        total = g.array() + dh.array();
        through = total.colwise() * keep;  // through the new state
        dc = through * (1.0f - z) * (1.0f - c * c);
        d_projected.leftCols(u).array() = through * (previous.array() - c) * z * (1.0f - z);
        d_projected.middleCols(u, u).array() = dc * hh * r * (1.0f - r);
        d_projected.rightCols(u).array() = dc;
        d_inner.leftCols(2 * u) = d_projected.leftCols(2 * u);
        d_inner.rightCols(u) = (dc * r).matrix();
        products.Multiply(previous_view.Transposed(), View::Of(d_inner), block_dU.data(),
                          3 * u, true);
        block_db.noalias() += d_inner.colwise().sum();
        g.array() = through * z + total.colwise() * (1.0f - keep);
        products.Multiply(View::Of(d_inner), U_transposed, g.data(), u, true);
        projection.Backward(x, steps, t, d_projected, &products, dx,
                            &block_dWs[begin / kRowsPerBlock], &block_dbxs[begin / kRowsPerBlock]);
      }
      StoreRows(dx, n * steps * features, sequence_grad_rows + begin * steps * features);
    });
    for (const Matrix& part : block_dUs) dU += part;
    for (const Eigen::RowVectorXf& part : block_dbs) db += part;
    SumBlocks(block_dWs, input_kernel_grad);
    SumBlocks(block_dbxs, input_bias_grad);
  }
};

// ------------------------------------------------------------------------------------------------
// AUGRU

REGISTER_OP("SimMerlinAugru")
    .Attr("T: {float, bfloat16}")  // the dtype of the large input (rows.h)
    .Attr("bf16_products: bool = false")  // bfloat16 products, float32 sums
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("sequence: T")            // [B, T, F]
    .Input("kernel: float")          // [F, 3u]: the input's part of the kernels, [W_gx | W_cx]
    .Input("input_bias: float")      // [3u]: [b_g | b_c]
    .Input("gate_kernel: float")     // [u, 2u]: the state's part of the gate kernel (r, u)
    .Input("candidate_kernel: float")  // [u, u]: the state's part of the candidate kernel
    .Input("scores: float")          // [B, T] attention scores a_t
    .Input("mask: float")            // [B, T]
    // true: the activations output holds what the gradient needs (each block's states, reset
    // and update gates and candidates, (4T + 1) u floats per row), so the gradient op does not
    // recompute the forward pass; false: it is empty and the gradient recomputes it
    .Attr("keep_activations: bool = false")
    .Output("final_state: float")    // [B, u]
    .Output("activations: float")    // [B (4T + 1) u] or [0]
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle sequence, kernel;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &sequence));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 2, &kernel));
      c->set_output(0, c->MakeShape({c->Dim(sequence, 0), c->Dim(kernel, 0)}));
      c->set_output(1, c->Vector(c->UnknownDim()));
      return Status();
    });

REGISTER_OP("SimMerlinAugruGrad")
    .Attr("T: {float, bfloat16}")
    .Attr("bf16_products: bool = false")  // bfloat16 products, float32 sums
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("sequence: T")
    .Input("kernel: float")
    .Input("input_bias: float")
    .Input("gate_kernel: float")
    .Input("candidate_kernel: float")
    .Input("scores: float")
    .Input("mask: float")
    .Input("final_state_grad: float")  // [B, u]
    .Input("activations: float")  // the forward op's: kept activations, or empty (recomputed)
    .Output("sequence_grad: T")
    .Output("kernel_grad: float")
    .Output("input_bias_grad: float")
    .Output("gate_kernel_grad: float")
    .Output("candidate_kernel_grad: float")
    .Output("scores_grad: float")
    .SetShapeFn([](InferenceContext* c) {
      for (int i = 0; i < 6; ++i) c->set_output(i, c->input(i));
      return Status();
    });

// The forward recurrence of rows begin..end, keeping what the backward pass needs when asked:
// in `kept` (KeptSize floats: the forward op's activations output, read back by the gradient op)
// or in storage of its own.
struct AugruBlock {
  int64_t n, u, steps;
  bool keep_all;
  sim_merlin::FloatBuffer own;  // the storage when none is given
  float* base;
  Eigen::Map<Matrix> states;            // [(T + 1) * n, u] (or two alternating [n, u] buffers)
  Eigen::Map<Array> reset, update, candidate;  // [T * n, u] each, when kept

  static int64_t KeptSize(int64_t n, int64_t u, int64_t steps) { return (4 * steps + 1) * n * u; }

  AugruBlock(int64_t n_, int64_t u_, int64_t steps_, bool keep, float* kept = nullptr)
      : n(n_), u(u_), steps(steps_), keep_all(keep),
        base(kept != nullptr ? kept : Own(keep ? KeptSize(n_, u_, steps_) : 2 * n_ * u_)),
        states(base, keep ? (steps_ + 1) * n_ : 2 * n_, u_),
        reset(Part(1), keep ? steps_ * n_ : 0, u_),
        update(Part(2), keep ? steps_ * n_ : 0, u_),
        candidate(Part(3), keep ? steps_ * n_ : 0, u_) {}

 private:
  float* Own(int64_t size) {
    own.resize(size);
    return own.data();
  }
  // the k-th [T * n, u] array after the states (k = 1, 2, 3), when kept
  float* Part(int k) const {
    return keep_all ? base + ((steps + 1) + (k - 1) * steps) * n * u : base;
  }

 public:
  // Runs the recurrence of rows begin.. (inputs: theirs, [n, T, F]; a, m: the whole [B, T]
  // scores and mask); returns a pointer to the final state [n, u].
  const float* Run(const float* inputs, const InputProjection& projection,
                   const Weight& gate_kernel, const Weight& candidate_kernel, const float* a,
                   const float* m, int64_t begin, Products* products) {
    Matrix x, gates(n, 2 * u), reset_state(n, u), candidate_in(n, u);
    Array rg(n, 2 * u), c(n, u), scaled(n, u);
    Column keep(n), attention(n);
    states.topRows(n).setZero();
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t now = keep_all ? t : (t % 2), next = keep_all ? t + 1 : 1 - now;
      auto s = states.middleRows(now * n, n);
      auto s_next = states.middleRows(next * n, n);
      projection.Forward(inputs, n, steps, t, products, &x);
      GatherColumn(m, steps, begin, n, t, keep.data());
      GatherColumn(a, steps, begin, n, t, attention.data());
      products->Multiply({s.data(), n, u, u, 1}, gate_kernel, gates.data(), 2 * u, false);
      rg = Sigmoid(x.leftCols(2 * u).array() + gates.array());
      reset_state.array() = rg.leftCols(u) * s.array();
      products->Multiply(View::Of(reset_state), candidate_kernel, candidate_in.data(), u, false);
      c = (x.rightCols(u).array() + candidate_in.array()).tanh();
      scaled = rg.rightCols(u).colwise() * (1.0f - attention);
      s_next.array() = s.array() +
                       ((scaled * s.array() + (1.0f - scaled) * c) - s.array()).colwise() * keep;
      if (keep_all) {
        reset.middleRows(t * n, n) = rg.leftCols(u);
        update.middleRows(t * n, n) = rg.rightCols(u);
        candidate.middleRows(t * n, n) = c;
      }
    }
    const int64_t last = keep_all ? steps : (steps % 2);
    return states.data() + last * n * u;
  }
};

Status CheckAugruInputs(const Tensor& sequence, const Tensor& kernel, const Tensor& input_bias,
                        const Tensor& gate_kernel, const Tensor& candidate_kernel,
                        const Tensor& scores, const Tensor& mask) {
  if (candidate_kernel.dims() != 2 ||
      candidate_kernel.dim_size(0) != candidate_kernel.dim_size(1)) {
    return tensorflow::errors::InvalidArgument("candidate_kernel must be [u, u], got ",
                                               candidate_kernel.shape().DebugString());
  }
  const int64_t u = candidate_kernel.dim_size(0);
  if (gate_kernel.dims() != 2 || gate_kernel.dim_size(0) != u || gate_kernel.dim_size(1) != 2 * u) {
    return tensorflow::errors::InvalidArgument("gate_kernel must be [u, 2u] = [", u, ", ", 2 * u,
                                               "], got ", gate_kernel.shape().DebugString());
  }
  TF_RETURN_IF_ERROR(CheckRecurrentInputs(sequence, kernel, input_bias, mask, 3 * u));
  for (const Tensor* t : {&scores, &mask}) {
    if (t->dims() != 2 || t->dim_size(0) != sequence.dim_size(0) ||
        t->dim_size(1) != sequence.dim_size(1)) {
      return tensorflow::errors::InvalidArgument("scores and mask must be [batch, steps], got ",
                                                 t->shape().DebugString());
    }
  }
  return Status();
}

template <typename T>
class AugruOp : public sim_merlin::RowBlockKernel {
 public:
  explicit AugruOp(OpKernelConstruction* context) : RowBlockKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("keep_activations", &keep_activations_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor &sequence = context->input(0), &gate_kernel = context->input(3),
                 &candidate_kernel = context->input(4), &scores = context->input(5),
                 &mask = context->input(6);
    OP_REQUIRES_OK(context, CheckAugruInputs(sequence, context->input(1), context->input(2),
                                             gate_kernel, candidate_kernel, scores, mask));
    const int64_t u = candidate_kernel.dim_size(0);
    const int64_t rows = sequence.dim_size(0), steps = sequence.dim_size(1);
    const int64_t features = sequence.dim_size(2);
    Tensor* final_state = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({rows, u}), &final_state));
    float* out = final_state->flat<float>().data();
    const int64_t kept_per_row = AugruBlock::KeptSize(1, u, steps);
    Tensor* activations = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(
                                1, TensorShape({keep_activations_ ? rows * kept_per_row : 0}),
                                &activations));
    float* kept = activations->flat<float>().data();
    const Weight Wg({gate_kernel.flat<float>().data(), u, 2 * u, 2 * u, 1}, bf16_);
    const Weight Wc({candidate_kernel.flat<float>().data(), u, u, u, 1}, bf16_);
    const T* sequence_rows = sequence.flat<T>().data();
    const InputProjection projection(context->input(1), context->input(2), bf16_, false);
    ForEachRowBlock(context, threads_, rows, steps * (u + features) * 3 * u * 2,
                    [&](int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      sim_merlin::FloatBuffer buffer;
      const float* x = InputRows(sequence_rows + begin * steps * features, n * steps * features,
                                 &buffer);
      Products products(bf16_);
      AugruBlock block(n, u, steps, keep_activations_,
                       keep_activations_ ? kept + begin * kept_per_row : nullptr);
      const float* last = block.Run(x, projection, Wg, Wc,
                                    scores.flat<float>().data(), mask.flat<float>().data(), begin,
                                    &products);
      std::copy_n(last, (end - begin) * u, out + begin * u);
    });
  }

 private:
  bool keep_activations_ = false;
};

template <typename T>
class AugruGradOp : public sim_merlin::RowBlockKernel {
 public:
  using RowBlockKernel::RowBlockKernel;

  void Compute(OpKernelContext* context) override {
    const Tensor &sequence = context->input(0), &gate_kernel = context->input(3),
                 &candidate_kernel = context->input(4), &scores = context->input(5),
                 &mask = context->input(6), &final_grad = context->input(7),
                 &activations = context->input(8);
    OP_REQUIRES_OK(context, CheckAugruInputs(sequence, context->input(1), context->input(2),
                                             gate_kernel, candidate_kernel, scores, mask));
    const int64_t u = candidate_kernel.dim_size(0);
    const int64_t rows = sequence.dim_size(0), steps = sequence.dim_size(1);
    const int64_t features = sequence.dim_size(2);
    OP_REQUIRES(context, final_grad.dims() == 2 && final_grad.dim_size(0) == rows &&
                             final_grad.dim_size(1) == u,
                tensorflow::errors::InvalidArgument("final_state_grad must be [batch, u]"));
    const int64_t kept_per_row = AugruBlock::KeptSize(1, u, steps);
    bool recompute = true;
    OP_REQUIRES_OK(context, CheckKeptActivations(activations, rows * kept_per_row, &recompute));
    // read only: the block's arrays are views of the forward op's output
    float* kept = const_cast<float*>(activations.flat<float>().data());
    Tensor *sequence_grad = nullptr, *input_kernel_grad = nullptr, *input_bias_grad = nullptr;
    Tensor *gate_grad = nullptr, *candidate_grad = nullptr, *scores_grad = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, sequence.shape(), &sequence_grad));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(1).shape(),
                                                     &input_kernel_grad));
    OP_REQUIRES_OK(context, context->allocate_output(2, context->input(2).shape(),
                                                     &input_bias_grad));
    OP_REQUIRES_OK(context, context->allocate_output(3, gate_kernel.shape(), &gate_grad));
    OP_REQUIRES_OK(context, context->allocate_output(4, candidate_kernel.shape(), &candidate_grad));
    OP_REQUIRES_OK(context, context->allocate_output(5, scores.shape(), &scores_grad));
    MatrixMap dWg(gate_grad->flat<float>().data(), u, 2 * u);
    MatrixMap dWc(candidate_grad->flat<float>().data(), u, u);
    dWg.setZero();
    dWc.setZero();
    const View gate_view{gate_kernel.flat<float>().data(), u, 2 * u, 2 * u, 1};
    const View candidate_view{candidate_kernel.flat<float>().data(), u, u, u, 1};
    const Weight Wg(gate_view, bf16_), Wg_transposed(gate_view.Transposed(), bf16_);
    const Weight Wc(candidate_view, bf16_), Wc_transposed(candidate_view.Transposed(), bf16_);
    const float* a = scores.flat<float>().data();
    const float* m = mask.flat<float>().data();
    const float* dfinal = final_grad.flat<float>().data();
    const T* sequence_rows = sequence.flat<T>().data();
    T* sequence_grad_rows = sequence_grad->flat<T>().data();
    float* da = scores_grad->flat<float>().data();
    const InputProjection projection(context->input(1), context->input(2), bf16_, true);
    std::vector<Matrix> block_dWgs(BlockCount(rows), Matrix::Zero(u, 2 * u));
    std::vector<Matrix> block_dWcs(BlockCount(rows), Matrix::Zero(u, u));
    std::vector<Matrix> block_dWs(BlockCount(rows), Matrix::Zero(features, 3 * u));
    std::vector<Eigen::RowVectorXf> block_dbxs(BlockCount(rows), Eigen::RowVectorXf::Zero(3 * u));

    ForEachRowBlock(context, threads_, rows, steps * (u + features) * 3 * u * 6,
                    [&](int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      sim_merlin::FloatBuffer x_buffer, dx_buffer;  // this block's rows as float32 (rows.h)
      const float* x = InputRows(sequence_rows + begin * steps * features, n * steps * features,
                                 &x_buffer);
      float* dx = OutputRows(sequence_grad_rows + begin * steps * features, n * steps * features,
                             &dx_buffer);
      Products products(bf16_);
      Matrix d_projected_rows(n, 3 * u);
      AugruBlock block(n, u, steps, true, recompute ? nullptr : kept + begin * kept_per_row);
      if (recompute) block.Run(x, projection, Wg, Wc, a, m, begin, &products);
      Matrix& block_dWg = block_dWgs[begin / kRowsPerBlock];
      Matrix& block_dWc = block_dWcs[begin / kRowsPerBlock];
      Matrix g(n, u), d_gates(n, 2 * u), d_candidate(n, u), d_reset_state(n, u);
      Matrix reset_state(n, u);
      Array through(n, u), scaled(n, u), d_scaled(n, u);
      Column keep(n), attention(n), d_attention(n);
      std::copy_n(dfinal + begin * u, n * u, g.data());
      for (int64_t t = steps - 1; t >= 0; --t) {
        const auto s = block.states.middleRows(t * n, n).array();
        const auto r = block.reset.middleRows(t * n, n);
        const auto up = block.update.middleRows(t * n, n);
        const auto c = block.candidate.middleRows(t * n, n);
        GatherColumn(m, steps, begin, n, t, keep.data());
        GatherColumn(a, steps, begin, n, t, attention.data());
        auto d_projected = d_projected_rows.array();
        through = g.array().colwise() * keep;
        scaled = up.colwise() * (1.0f - attention);
        d_scaled = through * (s - c);
        d_projected.rightCols(u) = through * (1.0f - scaled) * (1.0f - c * c);
        d_attention = -(d_scaled * up).rowwise().sum();
        ScatterColumn(d_attention.data(), steps, begin, n, t, da);
        d_projected.middleCols(u, u) = (d_scaled.colwise() * (1.0f - attention)) * up * (1.0f - up);
        g.array() = through * scaled + g.array().colwise() * (1.0f - keep);
        d_candidate = d_projected.rightCols(u).matrix();
        products.Multiply(View::Of(d_candidate), Wc_transposed, d_reset_state.data(), u, false);
        reset_state.array() = r * s;
        products.Multiply(View::Of(reset_state).Transposed(), View::Of(d_candidate),
                          block_dWc.data(), u, true);
        d_projected.leftCols(u) = d_reset_state.array() * s * r * (1.0f - r);
        g.array() += d_reset_state.array() * r;
        d_gates = d_projected.leftCols(2 * u).matrix();
        products.Multiply(View{block.states.data() + t * n * u, n, u, u, 1}.Transposed(),
                          View::Of(d_gates), block_dWg.data(), 2 * u, true);
        products.Multiply(View::Of(d_gates), Wg_transposed, g.data(), u, true);
        projection.Backward(x, steps, t, d_projected_rows, &products, dx,
                            &block_dWs[begin / kRowsPerBlock], &block_dbxs[begin / kRowsPerBlock]);
      }
      StoreRows(dx, n * steps * features, sequence_grad_rows + begin * steps * features);
    });
    for (const Matrix& part : block_dWgs) dWg += part;
    for (const Matrix& part : block_dWcs) dWc += part;
    SumBlocks(block_dWs, input_kernel_grad);
    SumBlocks(block_dbxs, input_bias_grad);
  }
};

REGISTER_KERNEL_BUILDER(Name("SimMerlinGru").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        GruOp<float>);
REGISTER_KERNEL_BUILDER(Name("SimMerlinGru").Device(DEVICE_CPU).TypeConstraint<Bfloat16>("T"),
                        GruOp<Bfloat16>);
REGISTER_KERNEL_BUILDER(Name("SimMerlinGruGrad").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        GruGradOp<float>);
REGISTER_KERNEL_BUILDER(Name("SimMerlinGruGrad").Device(DEVICE_CPU).TypeConstraint<Bfloat16>("T"),
                        GruGradOp<Bfloat16>);
REGISTER_KERNEL_BUILDER(Name("SimMerlinAugru").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        AugruOp<float>);
REGISTER_KERNEL_BUILDER(Name("SimMerlinAugru").Device(DEVICE_CPU).TypeConstraint<Bfloat16>("T"),
                        AugruOp<Bfloat16>);
REGISTER_KERNEL_BUILDER(Name("SimMerlinAugruGrad").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        AugruGradOp<float>);
REGISTER_KERNEL_BUILDER(Name("SimMerlinAugruGrad").Device(DEVICE_CPU).TypeConstraint<Bfloat16>("T"),
                        AugruGradOp<Bfloat16>);

}  // namespace
