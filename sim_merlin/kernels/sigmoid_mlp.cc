// DIEN's sigmoid MLPs as one op (sim_merlin.kernels).
//
// The auxiliary tower (100-50-1 over 2 x 9 pairs per sample) and DIEN's attention unit (80-40-1
// over 10 steps per sample) are MLPs with sigmoid activations over many short rows. As TensorFlow
// ops each layer is a product, a bias, a sigmoid, and twice as many ops backward, each a pass
// over memory. Both callers share a part of the first layer between consecutive rows (the
// auxiliary tower's state between a pair, the attention unit's query between the steps of a
// sample), so the op takes the first layer in two parts: rows come in groups of `repeat`
// (= rows / shared rows), and
//
// SimMerlinSigmoidMlp (L = layers >= 1 dense layers after the first):
//   a_0 = sigmoid(x_n W + shared_{n / repeat});  a_i = sigmoid(a_{i-1} K_{i-1} + b_{i-1}) for i < L;
//   out = a_{L-1} K_{L-1} + b_{L-1}  (the output layer is linear)
// x may have no columns (then the first layer's pre-activation is `shared`, one row per row).
// Hidden products (W too) are bfloat16 with float32 sums when bf16_products (as TensorFlow's
// products under mixed_bfloat16); the output layer's product is float32 (it is a few dot products
// per row). The gradient kernel recomputes the activations of its block; the shared part's
// gradient is the sum of its group's rows.

#include <algorithm>
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
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::OpOutputList;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

using sim_merlin::Bfloat16;
using sim_merlin::InputRows;
using sim_merlin::Matrix;
using sim_merlin::OutputRows;
using sim_merlin::Products;
using sim_merlin::Sigmoid;
using sim_merlin::StoreRows;
using sim_merlin::View;
using sim_merlin::Weight;
using RowVector = Eigen::RowVectorXf;

constexpr int64_t kRowsPerBlock = 256;  // a block's activations stay in L2 (whole groups)

REGISTER_OP("SimMerlinSigmoidMlp")
    .Attr("T: {float, bfloat16}")  // the pre-activation's dtype (rows.h)
    .Attr("layers: int >= 1")
    .Attr("bf16_products: bool = false")  // bfloat16 hidden products, float32 sums
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("inputs: T")                // x [N, D]: each row's own input (D may be 0)
    .Input("shared: T")                // [M, H_0]: a pre-activation part per group of N / M rows
    .Input("first_kernel: float")      // W [D, H_0]
    .Input("kernels: layers * float")  // K_i [H_i, H_{i+1}]
    .Input("biases: layers * float")   // b_i [H_{i+1}]
    .Output("outputs: float")          // [N, H_L]
    .SetShapeFn([](InferenceContext* c) {
      int layers = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("layers", &layers));
      ShapeHandle x, last;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2 + layers), 2, &last));
      c->set_output(0, c->Matrix(c->Dim(x, 0), c->Dim(last, 1)));
      return Status();
    });

REGISTER_OP("SimMerlinSigmoidMlpGrad")
    .Attr("T: {float, bfloat16}")
    .Attr("layers: int >= 1")
    .Attr("bf16_products: bool = false")
    .Attr("threads: int = 0")
    .Input("inputs: T")
    .Input("shared: T")
    .Input("first_kernel: float")
    .Input("kernels: layers * float")
    .Input("biases: layers * float")
    .Input("outputs_grad: float")  // [N, H_L]
    .Output("inputs_grad: T")
    .Output("shared_grad: T")
    .Output("first_kernel_grad: float")
    .Output("kernels_grad: layers * float")
    .Output("biases_grad: layers * float")
    .SetShapeFn([](InferenceContext* c) {
      int layers = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("layers", &layers));
      for (int i = 0; i < 3 + 2 * layers; ++i) c->set_output(i, c->input(i));
      return Status();
    });

// The op's inputs, checked against each other, and its weights viewed and packed. The first
// layer's weight W is weight 0 (it is a hidden product); K_i is weight i + 1.
class Layers {
 public:
  Status Read(OpKernelContext* context, bool bf16, bool transposed_too) {
    const Tensor &x = context->input(0), &shared = context->input(1);
    OpInputList kernels, biases;
    TF_RETURN_IF_ERROR(context->input_list("kernels", &kernels));
    TF_RETURN_IF_ERROR(context->input_list("biases", &biases));
    if (x.dims() != 2 || shared.dims() != 2) {
      return tensorflow::errors::InvalidArgument(
          "inputs and shared must be [rows, columns], got ", x.shape().DebugString(), " and ",
          shared.shape().DebugString());
    }
    rows_ = x.dim_size(0);
    const int64_t groups = shared.dim_size(0);
    if (groups == 0 ? rows_ != 0 : rows_ % groups != 0) {
      return tensorflow::errors::InvalidArgument(
          "the rows of inputs (", rows_, ") must be a whole number of groups, one per row of "
          "shared (", groups, ")");
    }
    repeat_ = groups == 0 ? 1 : rows_ / groups;
    // Whole groups per block, about kRowsPerBlock rows.
    block_rows_ = std::max<int64_t>(1, kRowsPerBlock / repeat_) * repeat_;
    input_width_ = x.dim_size(1);
    const Tensor& first = context->input(2);
    if (first.dims() != 2 || first.dim_size(0) != input_width_ ||
        first.dim_size(1) != shared.dim_size(1)) {
      return tensorflow::errors::InvalidArgument(
          "first_kernel must be [", input_width_, ", ", shared.dim_size(1), "] (inputs' columns, "
          "shared's columns), got ", first.shape().DebugString());
    }
    widths_ = {shared.dim_size(1)};
    AddWeight({first.flat<float>().data(), input_width_, widths_[0], widths_[0], 1},
              bf16 && input_width_ > 0,
              transposed_too);
    for (int i = 0; i < kernels.size(); ++i) {
      const Tensor &kernel = kernels[i], &bias = biases[i];
      if (kernel.dims() != 2 || kernel.dim_size(0) != widths_.back()) {
        return tensorflow::errors::InvalidArgument("kernels[", i, "] must be [", widths_.back(),
                                                   ", units], got ", kernel.shape().DebugString());
      }
      const int64_t width = kernel.dim_size(1);
      if (bias.NumElements() != width) {
        return tensorflow::errors::InvalidArgument("biases[", i, "] must have ", width,
                                                   " elements, got ", bias.shape().DebugString());
      }
      const bool output_layer = i + 1 == kernels.size();
      AddWeight({kernel.flat<float>().data(), widths_.back(), width, width, 1},
                bf16 && !output_layer, transposed_too);
      biases_.push_back(bias.flat<float>().data());
      widths_.push_back(width);
    }
    return Status();
  }

  int64_t rows() const { return rows_; }
  int64_t repeat() const { return repeat_; }
  int64_t block_rows() const { return block_rows_; }
  int64_t input_width() const { return input_width_; }
  int count() const { return static_cast<int>(biases_.size()); }  // layers after the first
  int64_t width(int i) const { return widths_[i]; }  // H_i; width(count()) is the output's
  const Weight& weight(int i) const { return weights_[i]; }  // 0: W; i > 0: K_{i-1}
  const Weight& transposed(int i) const { return transposed_[i]; }
  Eigen::Map<const RowVector> bias(int i) const { return {biases_[i], widths_[i + 1]}; }

  // Multiply-adds per row, forward.
  int64_t Cost() const {
    int64_t cost = input_width_ * widths_[0];
    for (int i = 0; i < count(); ++i) cost += widths_[i] * widths_[i + 1];
    return cost;
  }

  // The first layer's pre-activation of rows [begin, begin + n) (whole groups): x W + shared.
  // `x` is the block's inputs as float32 [n, D].
  template <typename T>
  Matrix PreActivation(const float* x, const T* shared, int64_t begin, int64_t n,
                       Products* hidden) const {
    const int64_t width = widths_[0], groups = n / repeat_;
    sim_merlin::FloatBuffer buffer;
    const Eigen::Map<const Matrix> shared_rows(
        InputRows(shared + begin / repeat_ * width, groups * width, &buffer), groups, width);
    Matrix pre(n, width);
    if (input_width_ == 0) {
      pre = shared_rows;  // repeat is 1
      return pre;
    }
    hidden->Multiply(View{x, n, input_width_, input_width_, 1}, weights_[0], pre.data(), width,
                     false);
    for (int64_t g = 0; g < groups; ++g) pre.middleRows(g * repeat_, repeat_).rowwise() +=
        shared_rows.row(g);
    return pre;
  }

  // The activations a_0 .. a_{L-1} of n rows and the output [n, H_L].
  void Forward(const Matrix& pre, Products* hidden, Products* output,
               std::vector<Matrix>* activations, Matrix* out) const {
    activations->resize(count());
    (*activations)[0] = Sigmoid(pre.array()).matrix();
    for (int i = 0; i < count(); ++i) {
      const bool output_layer = i + 1 == count();
      Matrix& target = output_layer ? *out : (*activations)[i + 1];
      target.resize(pre.rows(), widths_[i + 1]);
      (output_layer ? output : hidden)
          ->Multiply(View::Of((*activations)[i]), weights_[i + 1], target.data(), widths_[i + 1],
                     false);
      target.rowwise() += bias(i);
      if (!output_layer) target.array() = Sigmoid(target.array());
    }
  }

 private:
  void AddWeight(const View& view, bool bf16, bool transposed_too) {
    weights_.emplace_back(view, bf16);
    if (transposed_too) transposed_.emplace_back(view.Transposed(), bf16);
  }

  int64_t rows_ = 0, repeat_ = 1, block_rows_ = kRowsPerBlock, input_width_ = 0;
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
    const int64_t rows = layers.rows(), outputs = layers.width(layers.count());
    const int64_t input_width = layers.input_width();
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({rows, outputs}), &out));
    const T* x = context->input(0).flat<T>().data();
    const T* shared = context->input(1).flat<T>().data();
    float* o = out->flat<float>().data();
    sim_merlin::ForEachRowBlock(
        context, threads_, rows, layers.block_rows(), 2 * layers.Cost(),
        [&](int64_t begin, int64_t end) {
          const int64_t n = end - begin;
          Products hidden(bf16_), output(false);
          sim_merlin::FloatBuffer buffer;
          const float* x_rows = InputRows(x + begin * input_width, n * input_width, &buffer);
          std::vector<Matrix> activations;
          Matrix block_out;
          layers.Forward(layers.PreActivation(x_rows, shared, begin, n, &hidden), &hidden,
                         &output, &activations, &block_out);
          std::copy_n(block_out.data(), n * outputs, o + begin * outputs);
        });
  }
};

template <typename T>
class SigmoidMlpGradOp : public sim_merlin::RowBlockKernel {
 public:
  using RowBlockKernel::RowBlockKernel;

  void Compute(OpKernelContext* context) override {
    Layers layers;
    OP_REQUIRES_OK(context, layers.Read(context, bf16_, true));
    const int count = layers.count();
    const Tensor& out_grad = context->input(3 + 2 * count);
    const int64_t rows = layers.rows(), outputs = layers.width(count);
    const int64_t input_width = layers.input_width(), width = layers.width(0);
    const int64_t repeat = layers.repeat(), block_rows = layers.block_rows();
    OP_REQUIRES(context, out_grad.dims() == 2 && out_grad.dim_size(0) == rows &&
                             out_grad.dim_size(1) == outputs,
                tensorflow::errors::InvalidArgument("outputs_grad must be [", rows, ", ", outputs,
                                                    "], got ", out_grad.shape().DebugString()));
    Tensor *x_grad = nullptr, *shared_grad = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(0).shape(), &x_grad));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(1).shape(), &shared_grad));
    // Weight gradients: 0 is W's, i > 0 is K_{i-1}'s (with bias i - 1's).
    std::vector<Eigen::Map<Matrix>> dK;
    std::vector<Eigen::Map<RowVector>> db;
    Tensor* first_grad = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(2, context->input(2).shape(), &first_grad));
    dK.emplace_back(first_grad->flat<float>().data(), input_width, width);
    OpOutputList kernel_grads, bias_grads;
    OP_REQUIRES_OK(context, context->output_list("kernels_grad", &kernel_grads));
    OP_REQUIRES_OK(context, context->output_list("biases_grad", &bias_grads));
    for (int i = 0; i < count; ++i) {
      Tensor *kernel_grad = nullptr, *bias_grad = nullptr;
      OP_REQUIRES_OK(context, kernel_grads.allocate(i, context->input(3 + i).shape(),
                                                    &kernel_grad));
      OP_REQUIRES_OK(context, bias_grads.allocate(i, context->input(3 + count + i).shape(),
                                                  &bias_grad));
      dK.emplace_back(kernel_grad->flat<float>().data(), layers.width(i), layers.width(i + 1));
      db.emplace_back(bias_grad->flat<float>().data(), layers.width(i + 1));
      db.back().setZero();
    }
    for (auto& k : dK) k.setZero();
    // Each block's weight gradients, summed in block order afterwards: the same result whatever
    // the threads (--deterministic).
    const int64_t blocks = sim_merlin::BlockCount(rows, block_rows);
    std::vector<std::vector<Matrix>> block_dK(blocks);
    std::vector<std::vector<RowVector>> block_db(blocks);
    const T* x = context->input(0).flat<T>().data();
    const T* shared = context->input(1).flat<T>().data();
    const float* dout = out_grad.flat<float>().data();
    T* x_grad_rows = x_grad->flat<T>().data();
    T* shared_grad_rows = shared_grad->flat<T>().data();

    sim_merlin::ForEachRowBlock(
        context, threads_, rows, block_rows, 6 * layers.Cost(), [&](int64_t begin, int64_t end) {
          const int64_t n = end - begin, groups = n / repeat;
          Products hidden(bf16_), output(false);
          sim_merlin::FloatBuffer x_buffer;
          const float* x_rows = InputRows(x + begin * input_width, n * input_width, &x_buffer);
          std::vector<Matrix> activations;
          Matrix block_out;
          layers.Forward(layers.PreActivation(x_rows, shared, begin, n, &hidden), &hidden,
                         &output, &activations, &block_out);
          std::vector<Matrix>& kernels_grad = block_dK[begin / block_rows];
          std::vector<RowVector>& biases_grad = block_db[begin / block_rows];
          kernels_grad.resize(count + 1);
          biases_grad.resize(count);
          // d: the gradient of layer i's output (pre-activation for hidden layers), [n, H_{i+1}]
          Matrix d = Eigen::Map<const Matrix>(dout + begin * outputs, n, outputs);
          for (int i = count - 1; i >= 0; --i) {
            Products& products = i + 1 == count ? output : hidden;
            kernels_grad[i + 1].resize(layers.width(i), layers.width(i + 1));
            products.Multiply(View::Of(activations[i]).Transposed(), View::Of(d),
                              kernels_grad[i + 1].data(), layers.width(i + 1), false);
            biases_grad[i] = d.colwise().sum();
            Matrix below(n, layers.width(i));
            products.Multiply(View::Of(d), layers.transposed(i + 1), below.data(),
                              layers.width(i), false);
            const auto a = activations[i].array();
            below.array() *= a * (1.0f - a);
            d = std::move(below);
          }
          // d is now the first layer's pre-activation gradient: the shared part's is its
          // group's sum, the inputs' is d W^T, W's is x^T d.
          sim_merlin::FloatBuffer grad_buffer;
          float* ds = OutputRows(shared_grad_rows + begin / repeat * width, groups * width,
                                 &grad_buffer);
          Eigen::Map<Matrix> shared_rows(ds, groups, width);
          for (int64_t g = 0; g < groups; ++g) {
            shared_rows.row(g) = d.middleRows(g * repeat, repeat).colwise().sum();
          }
          StoreRows(ds, groups * width, shared_grad_rows + begin / repeat * width);
          kernels_grad[0].resize(input_width, width);
          if (input_width == 0) return;
          const View x_view{x_rows, n, input_width, input_width, 1};
          hidden.Multiply(x_view.Transposed(), View::Of(d), kernels_grad[0].data(), width, false);
          float* dx = OutputRows(x_grad_rows + begin * input_width, n * input_width, &grad_buffer);
          hidden.Multiply(View::Of(d), layers.transposed(0), dx, input_width, false);
          StoreRows(dx, n * input_width, x_grad_rows + begin * input_width);
        });
    for (int64_t block = 0; block < blocks; ++block) {
      for (int i = 0; i <= count; ++i) dK[i] += block_dK[block][i];
      for (int i = 0; i < count; ++i) db[i] += block_db[block][i];
    }
  }
};

REGISTER_KERNEL_BUILDER(Name("SimMerlinSigmoidMlp").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        SigmoidMlpOp<float>);
REGISTER_KERNEL_BUILDER(
    Name("SimMerlinSigmoidMlp").Device(DEVICE_CPU).TypeConstraint<Bfloat16>("T"),
    SigmoidMlpOp<Bfloat16>);
REGISTER_KERNEL_BUILDER(
    Name("SimMerlinSigmoidMlpGrad").Device(DEVICE_CPU).TypeConstraint<float>("T"),
    SigmoidMlpGradOp<float>);
REGISTER_KERNEL_BUILDER(
    Name("SimMerlinSigmoidMlpGrad").Device(DEVICE_CPU).TypeConstraint<Bfloat16>("T"),
    SigmoidMlpGradOp<Bfloat16>);

}  // namespace
