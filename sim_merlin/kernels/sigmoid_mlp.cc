// DIEN's sigmoid MLPs as one op each way (sim_merlin.kernels).
//
// The auxiliary tower (100-50-1 over 2 x 9 pairs per sample) and DIEN's attention unit (80-40-1
// over 10 steps per sample) are MLPs with sigmoid activations over many short rows. As TensorFlow
// ops each layer is a product, a bias, a sigmoid, and twice as many ops backward, each a pass
// over memory; these kernels run the whole MLP of a block of rows in cache. Both callers' rows
// come in groups that share a part of the first layer's input (the auxiliary tower's state
// between a positive and a negative pair; the attention unit's query between the steps of a
// sample), so the first layer takes per-row inputs x [N, D] and per-group inputs g [M, G], each
// group r = N / M consecutive rows:
//
// SimMerlinSigmoidMlp (L = layers >= 1 dense layers K_i, b_i; row n in group m = n / r):
//   z_0 = x_n K_0 + g_m W_g + (x_n * g_m) W_p + b_0    (W_g, W_p may have no rows: no term)
//   a_i = sigmoid(z_i) for i < L - 1;  z_i = a_{i-1} K_i + b_i;  out = z_{L-1} (linear)
// The group's part g_m W_g + b_0 is computed once per group. The product term is DIN's
// [e, q, e - q, e * q] unit written without its concatenation (then G = D).
// Hidden products are bfloat16 with float32 sums when bf16_products (as TensorFlow's products
// under mixed_bfloat16); the output layer's product is float32 (a few dot products per row).
// The gradient kernel recomputes the activations of its block.

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
using tensorflow::OpInputList;
using tensorflow::OpKernelContext;
using tensorflow::OpOutputList;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

using sim_merlin::Bfloat16;
using sim_merlin::FloatBuffer;
using sim_merlin::InputRows;
using sim_merlin::Matrix;
using sim_merlin::OutputRows;
using sim_merlin::Products;
using sim_merlin::SigmoidInPlace;
using sim_merlin::StoreRows;
using sim_merlin::View;
using sim_merlin::Weight;
using RowVector = Eigen::RowVectorXf;
using ConstRows = Eigen::Map<const Matrix>;

constexpr int64_t kRowsPerBlock = 256;  // a block's activations stay in L2 (whole groups)

REGISTER_OP("SimMerlinSigmoidMlp")
    .Attr("T: {float, bfloat16}")  // the inputs' dtype (rows.h)
    .Attr("layers: int >= 1")
    .Attr("bf16_products: bool = false")  // bfloat16 hidden products, float32 sums
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("inputs: T")                // x [N, D]
    .Input("groups: T")                // g [M, G]: one row per group of N / M rows
    .Input("group_kernel: float")      // W_g [G, H_0]
    .Input("product_kernel: float")    // W_p [D or 0, H_0]
    .Input("kernels: layers * float")  // K_0 [D, H_0], K_i [H_{i-1}, H_i]
    .Input("biases: layers * float")   // b_i [H_i]
    .Output("outputs: float")          // [N, H_{L-1}]
    .SetShapeFn([](InferenceContext* c) {
      int layers = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("layers", &layers));
      ShapeHandle x, last;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3 + layers), 2, &last));
      c->set_output(0, c->Matrix(c->Dim(x, 0), c->Dim(last, 1)));
      return Status();
    });

REGISTER_OP("SimMerlinSigmoidMlpGrad")
    .Attr("T: {float, bfloat16}")
    .Attr("layers: int >= 1")
    .Attr("bf16_products: bool = false")
    .Attr("threads: int = 0")
    .Input("inputs: T")
    .Input("groups: T")
    .Input("group_kernel: float")
    .Input("product_kernel: float")
    .Input("kernels: layers * float")
    .Input("biases: layers * float")
    .Input("outputs_grad: float")  // [N, H_{L-1}]
    .Output("inputs_grad: T")
    .Output("groups_grad: T")
    .Output("group_kernel_grad: float")
    .Output("product_kernel_grad: float")
    .Output("kernels_grad: layers * float")
    .Output("biases_grad: layers * float")
    .SetShapeFn([](InferenceContext* c) {
      int layers = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("layers", &layers));
      for (int i = 0; i < 4 + 2 * layers; ++i) c->set_output(i, c->input(i));
      return Status();
    });

// SimMerlinSigmoidMlpLogisticLoss: the MLP's one output z per row as the logit of a binary label
// y (labels), weighted (weights): loss = sum_n w_n l_n with, for epsilon = 0, the logistic loss
// l = y softplus(-z) + (1 - y) softplus(z), and for epsilon > 0 the reference DIEN's
// l = -y log(sigmoid(z) + epsilon) - (1 - y) log(1 - sigmoid(z) - epsilon). Its outputs are the
// loss and its gradients (those of SimMerlinSigmoidMlpGrad for dz = w dl/dz): a training step
// then runs the MLP once (forward and backward in one op) instead of once forward and again in
// the gradient op; the registered gradient scales them by the loss's incoming gradient.
// With group_steps S > 1, groups is [M * S, G]: M samples of S steps, whose first S - 1 steps are
// the M (S - 1) groups of the rows (group m in row m + m / (S - 1)); each sample's last step is
// in no group and gets a zero gradient. DIEN's auxiliary loss pairs state t with behaviour t + 1:
// its groups are then the states themselves, not a copy without each sample's last step (and
// their gradient no copy padded back).
REGISTER_OP("SimMerlinSigmoidMlpLogisticLoss")
    .Attr("T: {float, bfloat16}")
    .Attr("layers: int >= 1")
    .Attr("epsilon: float = 0")
    .Attr("group_steps: int = 0")  // > 1: groups are samples of this many rows, see above
    .Attr("bf16_products: bool = false")
    .Attr("threads: int = 0")
    .Input("inputs: T")
    .Input("groups: T")
    .Input("group_kernel: float")
    .Input("product_kernel: float")
    .Input("kernels: layers * float")
    .Input("biases: layers * float")
    .Input("labels: float")   // [N]: y_n, 1 for a positive row, 0 for a negative one
    .Input("weights: float")  // [N]: w_n
    .Output("inputs_grad: T")
    .Output("groups_grad: T")
    .Output("group_kernel_grad: float")
    .Output("product_kernel_grad: float")
    .Output("kernels_grad: layers * float")
    .Output("biases_grad: layers * float")
    .Output("loss: float")  // scalar
    .SetShapeFn([](InferenceContext* c) {
      int layers = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("layers", &layers));
      for (int i = 0; i < 4 + 2 * layers; ++i) c->set_output(i, c->input(i));
      c->set_output(4 + 2 * layers, c->Scalar());
      return Status();
    });

// The op's inputs checked against each other, and its weights viewed and packed. The first
// layer's per-row weight is [K_0; W_p] (one product over [x, x * g]).
class Layers {
 public:
  Status Read(OpKernelContext* context, bool bf16, bool transposed_too,
              int64_t group_steps = 0) {
    const Tensor &x = context->input(0), &g = context->input(1);
    const Tensor &group_kernel = context->input(2), &product_kernel = context->input(3);
    OpInputList kernels, biases;
    TF_RETURN_IF_ERROR(context->input_list("kernels", &kernels));
    TF_RETURN_IF_ERROR(context->input_list("biases", &biases));
    if (x.dims() != 2 || g.dims() != 2) {
      return tensorflow::errors::InvalidArgument(
          "inputs and groups must be [rows, columns], got ", x.shape().DebugString(), " and ",
          g.shape().DebugString());
    }
    rows_ = x.dim_size(0);
    steps_ = group_steps > 1 ? group_steps : 0;
    if (steps_ > 0 && g.dim_size(0) % steps_ != 0) {
      return tensorflow::errors::InvalidArgument(
          "groups must be whole samples of group_steps = ", steps_, " rows, got ",
          g.dim_size(0), " rows");
    }
    const int64_t groups = steps_ > 0 ? g.dim_size(0) / steps_ * (steps_ - 1) : g.dim_size(0);
    if (groups == 0 ? rows_ != 0 : rows_ % groups != 0) {
      return tensorflow::errors::InvalidArgument(
          "the rows of inputs (", rows_, ") must be a whole number of groups, one per row of "
          "groups (", groups, ")");
    }
    repeat_ = groups == 0 ? 1 : rows_ / groups;
    block_rows_ = std::max<int64_t>(1, kRowsPerBlock / repeat_) * repeat_;  // whole groups
    input_width_ = x.dim_size(1);
    group_width_ = g.dim_size(1);
    for (int i = 0; i < kernels.size(); ++i) {
      const Tensor &kernel = kernels[i], &bias = biases[i];
      const int64_t fan_in = i == 0 ? input_width_ : widths_.back();
      if (kernel.dims() != 2 || kernel.dim_size(0) != fan_in) {
        return tensorflow::errors::InvalidArgument("kernels[", i, "] must be [", fan_in,
                                                   ", units], got ", kernel.shape().DebugString());
      }
      const int64_t width = kernel.dim_size(1);
      if (bias.NumElements() != width) {
        return tensorflow::errors::InvalidArgument("biases[", i, "] must have ", width,
                                                   " elements, got ", bias.shape().DebugString());
      }
      biases_.push_back(bias.flat<float>().data());
      widths_.push_back(width);
    }
    const int64_t first = widths_[0];
    const bool first_bf16 = bf16 && kernels.size() > 1;  // the first layer is a hidden one
    if (group_kernel.dims() != 2 || group_kernel.dim_size(0) != group_width_ ||
        group_kernel.dim_size(1) != first) {
      return tensorflow::errors::InvalidArgument("group_kernel must be [", group_width_, ", ",
                                                 first, "], got ",
                                                 group_kernel.shape().DebugString());
    }
    product_width_ = product_kernel.dims() == 2 ? product_kernel.dim_size(0) : -1;
    if (product_kernel.dims() != 2 || product_kernel.dim_size(1) != first ||
        (product_width_ != 0 && (product_width_ != input_width_ ||
                                 group_width_ != input_width_))) {
      return tensorflow::errors::InvalidArgument(
          "product_kernel must be [0, ", first, "] or, when inputs and groups have the same "
          "width, [", input_width_, ", ", first, "]; got ", product_kernel.shape().DebugString(),
          " for inputs of width ", input_width_, " and groups of width ", group_width_);
    }
    row_kernel_.resize(input_width_ + product_width_, first);
    row_kernel_.topRows(input_width_) = ConstRows(kernels[0].flat<float>().data(), input_width_,
                                                  first);
    row_kernel_.bottomRows(product_width_) =
        ConstRows(product_kernel.flat<float>().data(), product_width_, first);
    AddWeight(View::Of(row_kernel_), first_bf16 && row_kernel_.rows() > 0, transposed_too);
    AddWeight({group_kernel.flat<float>().data(), group_width_, first, first, 1},
              first_bf16 && group_width_ > 0, transposed_too);
    for (int i = 1; i < kernels.size(); ++i) {
      const bool output_layer = i + 1 == kernels.size();
      AddWeight({kernels[i].flat<float>().data(), widths_[i - 1], widths_[i], widths_[i], 1},
                bf16 && !output_layer, transposed_too);
    }
    return Status();
  }

  int64_t rows() const { return rows_; }
  int64_t repeat() const { return repeat_; }
  int64_t block_rows() const { return block_rows_; }
  int64_t input_width() const { return input_width_; }      // D
  int64_t group_width() const { return group_width_; }      // G
  int64_t product_width() const { return product_width_; }  // P: D or 0
  int64_t row_width() const { return input_width_ + product_width_; }  // [x, x * g]
  int count() const { return static_cast<int>(biases_.size()); }  // L
  int64_t width(int i) const { return widths_[i]; }                // H_i
  bool output_layer(int i) const { return i + 1 == count(); }
  // 0: [K_0; W_p]; 1: W_g; i + 1 for i >= 1: K_i
  const Weight& weight(int k) const { return weights_[k]; }
  const Weight& transposed(int k) const { return transposed_[k]; }
  Eigen::Map<const RowVector> bias(int i) const { return {biases_[i], widths_[i]}; }

  // Multiply-adds per row, forward.
  int64_t Cost() const {
    int64_t cost = (row_width() + group_width_ / repeat_) * widths_[0];
    for (int i = 1; i < count(); ++i) cost += widths_[i - 1] * widths_[i];
    return cost;
  }

  // Groups first .. first + count - 1 as float32 rows [count, G]: the input's own rows when they
  // are float32 and contiguous, else converted (or gathered, with group steps) into `buffer`.
  template <typename T>
  const float* GroupRows(const T* g, int64_t first, int64_t count, FloatBuffer* buffer) const {
    const int64_t width = group_width_;
    if (steps_ == 0) return InputRows(g + first * width, count * width, buffer);
    buffer->resize(count * width);
    ForEachRun(first, count, [&](int64_t i, int64_t row, int64_t run, bool) {
      sim_merlin::Widen(g + row * width, run * width, buffer->data() + i * width);
    });
    return buffer->data();
  }

  // Stores the gradient rows [count, G] of groups first .. first + count - 1 into `out` (the
  // groups input's shape); with group steps, also zeros each sample's last step after them.
  template <typename T>
  void StoreGroupRows(const float* rows, int64_t first, int64_t count, T* out) const {
    const int64_t width = group_width_;
    ForEachRun(first, count, [&](int64_t i, int64_t row, int64_t run, bool sample_end) {
      sim_merlin::Narrow(rows + i * width, run * width, out + row * width);
      if (sample_end) std::fill_n(out + (row + run) * width, width, T(0.0f));
    });
  }

  // The first product's left operand of n rows: x, or [x, x * g] with the product term.
  const float* RowInputs(const float* x, const float* g, int64_t n, Matrix* joined) const {
    if (product_width_ == 0) return x;
    const int64_t d = input_width_;
    joined->resize(n, 2 * d);
    const ConstRows x_rows(x, n, d), g_rows(g, n / repeat_, d);
    joined->leftCols(d) = x_rows;
    for (int64_t m = 0; m < n / repeat_; ++m) {
      joined->block(m * repeat_, d, repeat_, d) =
          (x_rows.middleRows(m * repeat_, repeat_).array().rowwise() * g_rows.row(m).array())
              .matrix();
    }
    return joined->data();
  }

  // z_0 .. z_{L-1} of n rows (whole groups) from their row inputs ([x, x * g]) and groups;
  // activations[i] = sigmoid(z_i) for i < L - 1, `out` = z_{L-1}.
  void Forward(const float* row_inputs, const float* g, int64_t n, Products* hidden,
               Products* output, std::vector<Matrix>* activations, Matrix* out) const {
    activations->resize(count() - 1);
    const int64_t groups = n / repeat_;
    Matrix& first = output_layer(0) ? *out : (*activations)[0];
    Products& first_products = output_layer(0) ? *output : *hidden;
    first.resize(n, widths_[0]);
    if (row_width() > 0) {
      first_products.Multiply(View{row_inputs, n, row_width(), row_width(), 1}, weights_[0],
                              first.data(), widths_[0], false);
    } else {
      first.setZero();
    }
    Matrix shared(groups, widths_[0]);  // g W_g + b_0, once per group
    if (group_width_ > 0) {
      first_products.Multiply(View{g, groups, group_width_, group_width_, 1}, weights_[1],
                              shared.data(), widths_[0], false);
      shared.rowwise() += bias(0);
    } else {
      shared.rowwise() = bias(0);
    }
    for (int64_t m = 0; m < groups; ++m) {
      first.middleRows(m * repeat_, repeat_).rowwise() += shared.row(m);
    }
    for (int i = 0; i < count(); ++i) {
      if (i > 0) {
        Matrix& target = output_layer(i) ? *out : (*activations)[i];
        target.resize(n, widths_[i]);
        (output_layer(i) ? output : hidden)
            ->Multiply(View::Of((*activations)[i - 1]), weights_[i + 1], target.data(),
                       widths_[i], false);
        target.rowwise() += bias(i);
      }
      if (!output_layer(i)) SigmoidInPlace((*activations)[i].data(), (*activations)[i].size());
    }
  }

 private:
  void AddWeight(const View& view, bool bf16, bool transposed_too) {
    weights_.emplace_back(view, bf16);
    if (transposed_too) transposed_.emplace_back(view.Transposed(), bf16);
  }

  // Calls run(i, row, length, sample_end) for each run of consecutive groups first + i ..
  // first + i + length - 1, stored from row `row` of the groups input; sample_end: the run ends
  // a sample (the row after it is that sample's last step, in no group).
  template <typename Run>
  void ForEachRun(int64_t first, int64_t count, Run run) const {
    if (steps_ == 0) {
      run(0, first, count, false);
      return;
    }
    const int64_t per_sample = steps_ - 1;
    for (int64_t i = 0; i < count;) {
      const int64_t group = first + i;
      const int64_t left = per_sample - group % per_sample;
      const int64_t length = std::min(count - i, left);
      run(i, group + group / per_sample, length, length == left);
      i += length;
    }
  }

  int64_t rows_ = 0, repeat_ = 1, block_rows_ = kRowsPerBlock, steps_ = 0;
  int64_t input_width_ = 0, group_width_ = 0, product_width_ = 0;
  Matrix row_kernel_;
  std::vector<int64_t> widths_;
  std::vector<Weight> weights_, transposed_;
  std::vector<const float*> biases_;
};

template <typename T>
class SigmoidMlpOp : public sim_merlin::RowBlockKernel {
 public:
  using RowBlockKernel::RowBlockKernel;

  void Compute(OpKernelContext* context) override {
    Layers layers;
    OP_REQUIRES_OK(context, layers.Read(context, bf16_, false));
    const int64_t rows = layers.rows(), outputs = layers.width(layers.count() - 1);
    const int64_t d = layers.input_width(), g_width = layers.group_width();
    const int64_t repeat = layers.repeat();
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({rows, outputs}), &out));
    const T* x = context->input(0).flat<T>().data();
    const T* g = context->input(1).flat<T>().data();
    float* o = out->flat<float>().data();
    sim_merlin::ForEachRowBlock(
        context, threads_, rows, layers.block_rows(), 2 * layers.Cost(),
        [&](int64_t begin, int64_t end) {
          const int64_t n = end - begin, first_group = begin / repeat, groups = n / repeat;
          Products hidden(bf16_), output(false);
          FloatBuffer x_buffer, g_buffer;
          const float* x_rows = InputRows(x + begin * d, n * d, &x_buffer);
          const float* g_rows = InputRows(g + first_group * g_width, groups * g_width, &g_buffer);
          Matrix joined, block_out;
          std::vector<Matrix> activations;
          layers.Forward(layers.RowInputs(x_rows, g_rows, n, &joined), g_rows, n, &hidden,
                         &output, &activations, &block_out);
          std::copy_n(block_out.data(), n * outputs, o + begin * outputs);
        });
  }
};

// dl/dz of one row's loss (see SimMerlinSigmoidMlpLogisticLoss) at logit z, label y; adds l to
// *loss. float32 as TensorFlow's ops of the plain path; sigmoid from exp, the softplus stable.
inline float LogisticGradient(float z, float y, float epsilon, double* loss) {
  const float s = 1.0f / (1.0f + std::exp(-z));
  // Each term only where its label weight is not 0 (the other term may be inf or NaN there).
  float gradient = 0.0f;
  if (epsilon > 0.0f) {
    const float positive = s + epsilon, negative = 1.0f - positive, slope = s * (1.0f - s);
    if (y != 0.0f) {
      *loss -= y * static_cast<double>(std::log(positive));
      gradient -= y * slope / positive;
    }
    if (y != 1.0f) {
      *loss -= (1.0f - y) * static_cast<double>(std::log(negative));
      gradient += (1.0f - y) * slope / negative;
    }
    return gradient;
  }
  const float tail = std::log1p(std::exp(-std::abs(z)));  // softplus(+-z) = max(+-z, 0) + tail
  if (y != 0.0f) *loss += y * static_cast<double>(std::max(-z, 0.0f) + tail);
  if (y != 1.0f) *loss += (1.0f - y) * static_cast<double>(std::max(z, 0.0f) + tail);
  return s - y;
}

// The gradient op (kLoss false: given the outputs' gradient) or the loss op (kLoss true: the
// outputs' gradient from the loss of each row, SimMerlinSigmoidMlpLogisticLoss).
template <typename T, bool kLoss>
class SigmoidMlpGradOp : public sim_merlin::RowBlockKernel {
 public:
  explicit SigmoidMlpGradOp(tensorflow::OpKernelConstruction* context) : RowBlockKernel(context) {
    if (kLoss) {
      OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
      OP_REQUIRES_OK(context, context->GetAttr("group_steps", &group_steps_));
    }
  }

  void Compute(OpKernelContext* context) override {
    Layers layers;
    OP_REQUIRES_OK(context, layers.Read(context, bf16_, true, group_steps_));
    const int count = layers.count();
    const Tensor& out_grad = context->input(4 + 2 * count);
    const int64_t rows = layers.rows(), outputs = layers.width(count - 1);
    const int64_t d = layers.input_width(), g_width = layers.group_width();
    const int64_t p_width = layers.product_width(), row_width = layers.row_width();
    const int64_t first = layers.width(0), repeat = layers.repeat();
    const int64_t block_rows = layers.block_rows();
    if (kLoss) {  // out_grad is the labels here
      const Tensor& weights = context->input(5 + 2 * count);
      OP_REQUIRES(context, outputs == 1,
                  tensorflow::errors::InvalidArgument(
                      "the logistic loss needs an MLP with one output (a logit), got ", outputs));
      for (const Tensor* t : {&out_grad, &weights}) {
        OP_REQUIRES(context, t->dims() == 1 && t->dim_size(0) == rows,
                    tensorflow::errors::InvalidArgument(
                        "labels and weights must be [", rows, "] (one per row of inputs), got ",
                        t->shape().DebugString()));
      }
    } else {
      OP_REQUIRES(context, out_grad.dims() == 2 && out_grad.dim_size(0) == rows &&
                               out_grad.dim_size(1) == outputs,
                  tensorflow::errors::InvalidArgument("outputs_grad must be [", rows, ", ",
                                                      outputs, "], got ",
                                                      out_grad.shape().DebugString()));
    }
    Tensor *x_grad = nullptr, *g_grad = nullptr, *group_kernel_grad = nullptr,
           *product_kernel_grad = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(0).shape(), &x_grad));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(1).shape(), &g_grad));
    OP_REQUIRES_OK(context,
                   context->allocate_output(2, context->input(2).shape(), &group_kernel_grad));
    OP_REQUIRES_OK(context,
                   context->allocate_output(3, context->input(3).shape(), &product_kernel_grad));
    OpOutputList kernel_grads, bias_grads;
    OP_REQUIRES_OK(context, context->output_list("kernels_grad", &kernel_grads));
    OP_REQUIRES_OK(context, context->output_list("biases_grad", &bias_grads));
    std::vector<Tensor*> dK(count), db(count);
    for (int i = 0; i < count; ++i) {
      OP_REQUIRES_OK(context, kernel_grads.allocate(i, context->input(4 + i).shape(), &dK[i]));
      OP_REQUIRES_OK(context,
                     bias_grads.allocate(i, context->input(4 + count + i).shape(), &db[i]));
    }
    // Each block's weight gradients (k as in Layers::weight), summed in block order afterwards:
    // the same result whatever the threads (--deterministic).
    const int64_t blocks = sim_merlin::BlockCount(rows, block_rows);
    std::vector<std::vector<Matrix>> block_dW(blocks);
    std::vector<std::vector<RowVector>> block_db(blocks);
    const T* x = context->input(0).flat<T>().data();
    const T* g = context->input(1).flat<T>().data();
    const float* dout = out_grad.flat<float>().data();  // or the labels (kLoss)
    const float* row_weights = kLoss ? context->input(5 + 2 * count).flat<float>().data() : nullptr;
    std::vector<double> block_loss(blocks, 0.0);
    T* x_grad_rows = x_grad->flat<T>().data();
    T* g_grad_rows = g_grad->flat<T>().data();

    sim_merlin::ForEachRowBlock(
        context, threads_, rows, block_rows, 6 * layers.Cost(), [&](int64_t begin, int64_t end) {
          const int64_t n = end - begin, first_group = begin / repeat, groups = n / repeat;
          Products hidden(bf16_), output(false);
          FloatBuffer x_buffer, g_buffer, grad_buffer;
          const float* x_rows = InputRows(x + begin * d, n * d, &x_buffer);
          const float* g_rows = layers.GroupRows(g, first_group, groups, &g_buffer);
          Matrix joined, block_out;
          std::vector<Matrix> activations;
          const float* row_inputs = layers.RowInputs(x_rows, g_rows, n, &joined);
          layers.Forward(row_inputs, g_rows, n, &hidden, &output, &activations, &block_out);
          std::vector<Matrix>& dW = block_dW[begin / block_rows];
          std::vector<RowVector>& dbias = block_db[begin / block_rows];
          dW.resize(count + 1);
          dbias.resize(count);
          // dz: the gradient of z_i, [n, H_i]
          Matrix dz(n, outputs);
          if (kLoss) {
            double loss = 0.0;
            for (int64_t i = 0; i < n; ++i) {
              double row_loss = 0.0;
              const float w = row_weights[begin + i];
              dz(i, 0) = w * LogisticGradient(block_out(i, 0), dout[begin + i], epsilon_,
                                              &row_loss);
              loss += w * row_loss;
            }
            block_loss[begin / block_rows] = loss;
          } else {
            dz = Eigen::Map<const Matrix>(dout + begin * outputs, n, outputs);
          }
          for (int i = count - 1; i >= 1; --i) {
            Products& products = layers.output_layer(i) ? output : hidden;
            dW[i + 1].resize(layers.width(i - 1), layers.width(i));
            products.Multiply(View::Of(activations[i - 1]).Transposed(), View::Of(dz),
                              dW[i + 1].data(), layers.width(i), false);
            dbias[i] = dz.colwise().sum();
            Matrix below(n, layers.width(i - 1));
            products.Multiply(View::Of(dz), layers.transposed(i + 1), below.data(),
                              layers.width(i - 1), false);
            const auto a = activations[i - 1].array();
            below.array() *= a * (1.0f - a);
            dz = std::move(below);
          }
          // The first layer: its groups' part gets the sums of the group's rows.
          Products& products = layers.output_layer(0) ? output : hidden;
          Matrix group_sums(groups, first);
          for (int64_t m = 0; m < groups; ++m) {
            group_sums.row(m) = dz.middleRows(m * repeat, repeat).colwise().sum();
          }
          dbias[0] = group_sums.colwise().sum();
          Matrix dg = Matrix::Zero(groups, g_width);
          dW[1].resize(g_width, first);
          if (g_width > 0) {
            const View g_view{g_rows, groups, g_width, g_width, 1};
            products.Multiply(g_view.Transposed(), View::Of(group_sums), dW[1].data(), first,
                              false);
            products.Multiply(View::Of(group_sums), layers.transposed(1), dg.data(), g_width,
                              false);
          }
          dW[0].resize(row_width, first);
          if (row_width > 0) {
            const View rows_view{row_inputs, n, row_width, row_width, 1};
            products.Multiply(rows_view.Transposed(), View::Of(dz), dW[0].data(), first, false);
            Matrix d_rows(n, row_width);  // the gradient of [x, x * g]
            products.Multiply(View::Of(dz), layers.transposed(0), d_rows.data(), row_width,
                              false);
            float* dx = OutputRows(x_grad_rows + begin * d, n * d, &grad_buffer);
            Eigen::Map<Matrix> dx_rows(dx, n, d);
            dx_rows = d_rows.leftCols(d);
            if (p_width > 0) {  // x * g: d x += d(x g) g, d g += sum over the group of d(x g) x
              const ConstRows x_block(x_rows, n, d), g_block(g_rows, groups, d);
              for (int64_t m = 0; m < groups; ++m) {
                const auto d_product = d_rows.block(m * repeat, d, repeat, d).array();
                dx_rows.middleRows(m * repeat, repeat).array() +=
                    d_product.rowwise() * g_block.row(m).array();
                dg.row(m).array() +=
                    (d_product * x_block.middleRows(m * repeat, repeat).array()).colwise().sum();
              }
            }
            StoreRows(dx, n * d, x_grad_rows + begin * d);
          }
          layers.StoreGroupRows(dg.data(), first_group, groups, g_grad_rows);
        });

    // Sum the blocks' gradients in block order into the outputs.
    Matrix row_kernel = Matrix::Zero(row_width, first);
    Eigen::Map<Matrix> dWg(group_kernel_grad->flat<float>().data(), g_width, first);
    dWg.setZero();
    std::vector<Eigen::Map<Matrix>> dKi;
    std::vector<Eigen::Map<RowVector>> dbi;
    for (int i = 0; i < count; ++i) {
      dKi.emplace_back(dK[i]->flat<float>().data(), dK[i]->dim_size(0), dK[i]->dim_size(1));
      dbi.emplace_back(db[i]->flat<float>().data(), layers.width(i));
      dKi.back().setZero();
      dbi.back().setZero();
    }
    for (int64_t block = 0; block < blocks; ++block) {
      row_kernel += block_dW[block][0];
      dWg += block_dW[block][1];
      for (int i = 1; i < count; ++i) dKi[i] += block_dW[block][i + 1];
      for (int i = 0; i < count; ++i) dbi[i] += block_db[block][i];
    }
    dKi[0] = row_kernel.topRows(d);
    Eigen::Map<Matrix>(product_kernel_grad->flat<float>().data(), p_width, first) =
        row_kernel.bottomRows(p_width);
    if (kLoss) {
      Tensor* loss = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(4 + 2 * count, TensorShape({}), &loss));
      double total = 0.0;  // in block order: the same sum whatever the threads
      for (double part : block_loss) total += part;
      loss->scalar<float>()() = static_cast<float>(total);
    }
  }

 private:
  float epsilon_ = 0.0f;
  int group_steps_ = 0;
};

#define SIM_MERLIN_REGISTER(T)                                                            \
  REGISTER_KERNEL_BUILDER(                                                                \
      Name("SimMerlinSigmoidMlp").Device(DEVICE_CPU).TypeConstraint<T>("T"),              \
      SigmoidMlpOp<T>);                                                                   \
  REGISTER_KERNEL_BUILDER(                                                                \
      Name("SimMerlinSigmoidMlpGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"),          \
      SigmoidMlpGradOp<T, false>);                                                       \
  REGISTER_KERNEL_BUILDER(                                                                \
      Name("SimMerlinSigmoidMlpLogisticLoss").Device(DEVICE_CPU).TypeConstraint<T>("T"),  \
      SigmoidMlpGradOp<T, true>);
SIM_MERLIN_REGISTER(float)
SIM_MERLIN_REGISTER(Bfloat16)
#undef SIM_MERLIN_REGISTER

}  // namespace
