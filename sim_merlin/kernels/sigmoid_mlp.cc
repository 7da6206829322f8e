// DIEN's sigmoid MLPs after their first product, as one op (sim_merlin.kernels).
//
// The auxiliary tower (100-50-1 over 2 x 9 pairs per sample) and DIEN's attention unit (80-40-1
// over 10 steps per sample) are MLPs with sigmoid activations over many short rows. As TensorFlow
// ops each layer is a product, a bias, a sigmoid, and twice as many ops backward, each a pass
// over memory. Their first products stay in TensorFlow (the callers split them to share a part
// between rows); these kernels take the first layer's pre-activation and run the rest of the MLP
// of a block of rows in cache:
//
// SimMerlinSigmoidMlp (L = layers >= 1 dense layers after the first):
//   a_0 = sigmoid(pre);  a_i = sigmoid(a_{i-1} K_{i-1} + b_{i-1}) for i < L;
//   out = a_{L-1} K_{L-1} + b_{L-1}  (the output layer is linear)
// Hidden products are bfloat16 with float32 sums when bf16_products (as TensorFlow's products
// under mixed_bfloat16); the output layer's product is float32 (it is a few dot products per
// row). The gradient kernel recomputes the activations of its block.

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

constexpr int64_t kRowsPerBlock = 256;  // a block's activations stay in L2

REGISTER_OP("SimMerlinSigmoidMlp")
    .Attr("T: {float, bfloat16}")  // the pre-activation's dtype (rows.h)
    .Attr("layers: int >= 1")
    .Attr("bf16_products: bool = false")  // bfloat16 hidden products, float32 sums
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("pre_activation: T")        // [N, H_0]: the first layer before its sigmoid
    .Input("kernels: layers * float")  // K_i [H_i, H_{i+1}]
    .Input("biases: layers * float")   // b_i [H_{i+1}]
    .Output("outputs: float")          // [N, H_L]
    .SetShapeFn([](InferenceContext* c) {
      int layers = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("layers", &layers));
      ShapeHandle pre, last;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &pre));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(layers), 2, &last));
      c->set_output(0, c->Matrix(c->Dim(pre, 0), c->Dim(last, 1)));
      return Status();
    });

REGISTER_OP("SimMerlinSigmoidMlpGrad")
    .Attr("T: {float, bfloat16}")
    .Attr("layers: int >= 1")
    .Attr("bf16_products: bool = false")
    .Attr("threads: int = 0")
    .Input("pre_activation: T")
    .Input("kernels: layers * float")
    .Input("biases: layers * float")
    .Input("outputs_grad: float")  // [N, H_L]
    .Output("pre_activation_grad: T")
    .Output("kernels_grad: layers * float")
    .Output("biases_grad: layers * float")
    .SetShapeFn([](InferenceContext* c) {
      int layers = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("layers", &layers));
      for (int i = 0; i < 1 + 2 * layers; ++i) c->set_output(i, c->input(i));
      return Status();
    });

// The layers' weights, checked against each other and the pre-activation, viewed and packed.
class Layers {
 public:
  Status Read(OpKernelContext* context, bool bf16, bool transposed_too) {
    const Tensor& pre = context->input(0);
    OpInputList kernels, biases;
    TF_RETURN_IF_ERROR(context->input_list("kernels", &kernels));
    TF_RETURN_IF_ERROR(context->input_list("biases", &biases));
    if (pre.dims() != 2) {
      return tensorflow::errors::InvalidArgument("pre_activation must be [rows, units], got ",
                                                 pre.shape().DebugString());
    }
    widths_ = {pre.dim_size(1)};
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
      const View view{kernel.flat<float>().data(), widths_.back(), width, width, 1};
      weights_.emplace_back(view, bf16 && !output_layer);
      if (transposed_too) transposed_.emplace_back(view.Transposed(), bf16 && !output_layer);
      biases_.push_back(bias.flat<float>().data());
      widths_.push_back(width);
    }
    return Status();
  }

  int count() const { return static_cast<int>(weights_.size()); }
  int64_t width(int i) const { return widths_[i]; }  // H_i; width(count()) is the output's
  const Weight& weight(int i) const { return weights_[i]; }
  const Weight& transposed(int i) const { return transposed_[i]; }
  Eigen::Map<const RowVector> bias(int i) const { return {biases_[i], widths_[i + 1]}; }

  // The forward pass of rows [begin, begin + n) of a pre-activation of type T (rows.h).
  template <typename T>
  void ForwardRows(const T* pre_rows, int64_t begin, int64_t n, Products* hidden,
                   Products* output, std::vector<Matrix>* activations, Matrix* out) const {
    std::vector<float> buffer;
    Forward(InputRows(pre_rows + begin * widths_[0], n * widths_[0], &buffer), n, hidden, output,
            activations, out);
  }

  // Multiply-adds per row, forward.
  int64_t Cost() const {
    int64_t cost = 0;
    for (int i = 0; i < count(); ++i) cost += widths_[i] * widths_[i + 1];
    return cost;
  }

  // The activations a_0 .. a_{L-1} of n rows and the output [n, H_L].
  void Forward(const float* pre, int64_t n, Products* hidden, Products* output,
               std::vector<Matrix>* activations, Matrix* out) const {
    activations->resize(count());
    (*activations)[0] =
        Sigmoid(Eigen::Map<const Matrix>(pre, n, widths_[0]).array()).matrix();
    for (int i = 0; i < count(); ++i) {
      const bool output_layer = i + 1 == count();
      Matrix& target = output_layer ? *out : (*activations)[i + 1];
      target.resize(n, widths_[i + 1]);
      (output_layer ? output : hidden)
          ->Multiply(View::Of((*activations)[i]), weights_[i], target.data(), widths_[i + 1],
                     false);
      target.rowwise() += bias(i);
      if (!output_layer) target.array() = Sigmoid(target.array());
    }
  }

 private:
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
    const Tensor& pre = context->input(0);
    const int64_t rows = pre.dim_size(0), outputs = layers.width(layers.count());
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({rows, outputs}), &out));
    const T* pre_rows = pre.flat<T>().data();
    float* o = out->flat<float>().data();
    sim_merlin::ForEachRowBlock(
        context, threads_, rows, kRowsPerBlock, 2 * layers.Cost(), [&](int64_t begin, int64_t end) {
          const int64_t n = end - begin;
          Products hidden(bf16_), output(false);
          std::vector<Matrix> activations;
          Matrix block_out;
          layers.ForwardRows(pre_rows, begin, n, &hidden, &output, &activations, &block_out);
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
    const Tensor& pre = context->input(0);
    const Tensor& out_grad = context->input(1 + 2 * layers.count());
    const int64_t rows = pre.dim_size(0), outputs = layers.width(layers.count());
    OP_REQUIRES(context, out_grad.dims() == 2 && out_grad.dim_size(0) == rows &&
                             out_grad.dim_size(1) == outputs,
                tensorflow::errors::InvalidArgument("outputs_grad must be [", rows, ", ", outputs,
                                                    "], got ", out_grad.shape().DebugString()));
    Tensor* pre_grad = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, pre.shape(), &pre_grad));
    OpOutputList kernel_grads, bias_grads;
    OP_REQUIRES_OK(context, context->output_list("kernels_grad", &kernel_grads));
    OP_REQUIRES_OK(context, context->output_list("biases_grad", &bias_grads));
    const int count = layers.count();
    std::vector<Eigen::Map<Matrix>> dK;
    std::vector<Eigen::Map<RowVector>> db;
    for (int i = 0; i < count; ++i) {
      Tensor *kernel_grad = nullptr, *bias_grad = nullptr;
      OP_REQUIRES_OK(context, kernel_grads.allocate(i, context->input(1 + i).shape(),
                                                    &kernel_grad));
      OP_REQUIRES_OK(context, bias_grads.allocate(i, context->input(1 + count + i).shape(),
                                                  &bias_grad));
      dK.emplace_back(kernel_grad->flat<float>().data(), layers.width(i), layers.width(i + 1));
      db.emplace_back(bias_grad->flat<float>().data(), layers.width(i + 1));
      dK.back().setZero();
      db.back().setZero();
    }
    // Each block's weight gradients, summed in block order afterwards: the same result whatever
    // the threads (--deterministic).
    const int64_t blocks = sim_merlin::BlockCount(rows, kRowsPerBlock);
    std::vector<std::vector<Matrix>> block_dK(blocks);
    std::vector<std::vector<RowVector>> block_db(blocks);
    const T* pre_rows = pre.flat<T>().data();
    const float* dout = out_grad.flat<float>().data();
    T* pre_grad_rows = pre_grad->flat<T>().data();

    sim_merlin::ForEachRowBlock(
        context, threads_, rows, kRowsPerBlock, 6 * layers.Cost(), [&](int64_t begin, int64_t end) {
          const int64_t n = end - begin, width = layers.width(0);
          Products hidden(bf16_), output(false);
          std::vector<Matrix> activations;
          Matrix block_out;
          layers.ForwardRows(pre_rows, begin, n, &hidden, &output, &activations, &block_out);
          std::vector<Matrix>& kernels_grad = block_dK[begin / kRowsPerBlock];
          std::vector<RowVector>& biases_grad = block_db[begin / kRowsPerBlock];
          kernels_grad.resize(count);
          biases_grad.resize(count);
          // d: the gradient of layer i's output (pre-activation for hidden layers), [n, H_{i+1}]
          Matrix d = Eigen::Map<const Matrix>(dout + begin * outputs, n, outputs);
          for (int i = count - 1; i >= 0; --i) {
            Products& products = i + 1 == count ? output : hidden;
            kernels_grad[i].setZero(layers.width(i), layers.width(i + 1));
            products.Multiply(View::Of(activations[i]).Transposed(), View::Of(d),
                              kernels_grad[i].data(), layers.width(i + 1), true);
            biases_grad[i] = d.colwise().sum();
            Matrix below(n, layers.width(i));
            products.Multiply(View::Of(d), layers.transposed(i), below.data(), layers.width(i),
                              false);
            const auto a = activations[i].array();
            below.array() *= a * (1.0f - a);
            d = std::move(below);
          }
          std::vector<float> grad_buffer;
          float* dp = OutputRows(pre_grad_rows + begin * width, n * width, &grad_buffer);
          Eigen::Map<Matrix>(dp, n, width) = d;
          StoreRows(dp, n * width, pre_grad_rows + begin * width);
        });
    for (int64_t block = 0; block < blocks; ++block) {
      for (int i = 0; i < count; ++i) {
        dK[i] += block_dK[block][i];
        db[i] += block_db[block][i];
      }
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
